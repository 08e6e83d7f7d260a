"""CrypTen 0.4.1 on pchmr's torch: the two adjustments pchmr makes, applied explicitly.

pchmr pins ``crypten==0.4.1`` and uses a small part of it: the distributed communicator, :class:`ArithmeticSharedTensor` built from
shares, addition, and ``get_plain_text``. On torch 2.13 two things in 0.4.1 stand in the way,
and :func:`ensure_crypten` handles both, once per process, before CrypTen is used:

1. **Import.** ``crypten.nn.onnx_converter`` (imported by ``import crypten``) runs
   ``from torch.onnx._internal.registration import registry``; torch 2.13 no longer has that
   module. The name is imported and never used. :func:`ensure_crypten` puts a placeholder module
   into ``sys.modules`` for the duration of ``import crypten`` and removes it afterwards, so no
   other code ever sees it. (ONNX conversion, which pchmr does not use, is not made to work.)

2. **Fixed-point decode.** ``FixedPointEncoder.decode`` floors a negative value with a divisor of
   ``scale - 1`` instead of ``scale``, so a negative value whose fraction lies within about
   ``|x| / scale`` of an integer decodes exactly 1.0 too low (−2.99998 → −3.99998 at 16 bits).
   :func:`ensure_crypten` replaces the method on the class with :func:`decode_fixed_point`, a
   floor division by ``scale`` plus the non-negative remainder. The replacement keeps 0.4.1's
   contract otherwise: a LongTensor in, a float32 tensor out, and ``scale == 1`` decodes to the
   integers themselves.

   Exactness (tested in ``tests/test_crypten_compat.py``): for every integer ``e`` with
   ``|e| < 2**24`` (every float32-representable fixed-point value at any precision), the
   decode is exactly ``e / scale`` — encode → decode of any dyadic ``x = e / scale`` therefore
   round-trips exactly. Larger ``|e|`` decode to the float32 nearest-ish of ``e / scale``
   (relative error ≤ 2⁻²³), as in 0.4.1 for positive values.

Any other CrypTen version is refused with :class:`CrypTenVersionError`: the adjustments target
0.4.1's exact code, and a release that fixes (or moves) them must be looked at again.

Installing it (:data:`INSTALL_HINT`; ``scripts/install.sh`` does both steps): the ``crypten`` extra
(``pip install 'pchmr[crypten]'``) brings what CrypTen imports (omegaconf, onnx); CrypTen itself is
installed with ``pip install --no-deps crypten==0.4.1``, because its declared requirements would
install torchvision (which pins its own torch), pandas, tensorboard and the withdrawn ``sklearn``
package, which refuses to install. Without CrypTen only this backend is unavailable: the
``secagg`` plugin refuses ``backend=crypten`` before a run starts, naming these two commands.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import threading
import types
from typing import Any

__all__ = [
    "CRYPTEN_VERSION",
    "INSTALL_HINT",
    "CrypTenUnavailableError",
    "CrypTenVersionError",
    "check_version",
    "decode_fixed_point",
    "ensure_crypten",
    "original_decode",
]

#: The one CrypTen release this layer is written for.
CRYPTEN_VERSION = "0.4.1"
_REMOVED_MODULE = "torch.onnx._internal.registration"
#: The two commands that install the crypten backend (scripts/install.sh runs both).
INSTALL_HINT = (
    f"pip install 'pchmr[crypten]' && pip install --no-deps crypten=={CRYPTEN_VERSION} "
    "(--no-deps: CrypTen's declared requirements include torchvision and the withdrawn 'sklearn' package; "
    "scripts/install.sh does both)"
)

_LOCK = threading.Lock()
_ORIGINAL_DECODE: Any = None
_APPLIED = False


class CrypTenUnavailableError(ImportError):
    """CrypTen (or one of the packages it imports at run time) is not installed."""


class CrypTenVersionError(RuntimeError):
    """The installed CrypTen is not the release this compatibility layer was written for."""


def check_version(version: str | None) -> None:
    """Raise unless ``version`` is :data:`CRYPTEN_VERSION` (None: CrypTen is not installed)."""
    if version is None:
        raise CrypTenUnavailableError(
            f"the crypten backend needs CrypTen {CRYPTEN_VERSION}, which is not installed: {INSTALL_HINT}"
        )
    if version != CRYPTEN_VERSION:
        raise CrypTenVersionError(
            f"pchmr's CrypTen compatibility layer is written for crypten=={CRYPTEN_VERSION} "
            f"(import shim for torch 2.13, fixed-point decode fix), but crypten {version} is installed; "
            f"install the pinned release: {INSTALL_HINT}"
        )


def _installed_version() -> str | None:
    try:
        return md.version("crypten")
    except md.PackageNotFoundError:
        return None


def decode_fixed_point(tensor: Any, scale: int) -> Any:
    """A fixed-point LongTensor ``e`` (any shape) → float32 ``e / scale``.

    ``e = q·scale + r`` with ``q = floor(e / scale)`` and ``0 ≤ r < scale``; the value is
    ``float(q) + float(r) / scale``. Exact for ``|e| < 2**24`` (see the module docstring).
    ``scale == 1`` returns ``e`` unchanged (integers), as CrypTen does.
    """
    import torch

    if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"a fixed-point decode needs an integer (LongTensor) tensor, got dtype {tensor.dtype}")
    if scale < 1:
        raise ValueError(f"a fixed-point scale must be a positive integer, got {scale}")
    if scale == 1:
        return tensor.data
    quotient = torch.div(tensor, scale, rounding_mode="floor")
    remainder = tensor - quotient * scale
    return quotient.float() + remainder.float() / scale


def _patched_decode(self: Any, tensor: Any) -> Any:
    """``FixedPointEncoder.decode`` as pchmr installs it (see :func:`decode_fixed_point`)."""
    if tensor is None:
        return None
    return decode_fixed_point(tensor, self._scale)


def _import_crypten() -> types.ModuleType:
    """``import crypten`` with the placeholder for the torch module 0.4.1 imports but never uses."""
    placeholder = None
    if _REMOVED_MODULE not in sys.modules:
        try:
            __import__(_REMOVED_MODULE)
        except ImportError:
            placeholder = types.ModuleType(_REMOVED_MODULE)
            placeholder.__doc__ = "pchmr placeholder: crypten 0.4.1 imports `registry` from here and never uses it"
            placeholder.registry = None  # type: ignore[attr-defined]
            sys.modules[_REMOVED_MODULE] = placeholder
    try:
        import crypten
    except ModuleNotFoundError as exc:
        raise CrypTenUnavailableError(
            f"CrypTen {CRYPTEN_VERSION} failed to import because '{exc.name}' is missing: {INSTALL_HINT}"
        ) from exc
    finally:
        if placeholder is not None and sys.modules.get(_REMOVED_MODULE) is placeholder:
            del sys.modules[_REMOVED_MODULE]
    return crypten


def ensure_crypten() -> types.ModuleType:
    """Check the version, import CrypTen and install the decode fix (idempotent); returns ``crypten``.

    Raises :class:`CrypTenUnavailableError` when it is not installed and
    :class:`CrypTenVersionError` for any release but :data:`CRYPTEN_VERSION`.
    """
    global _ORIGINAL_DECODE, _APPLIED
    with _LOCK:
        check_version(_installed_version())
        crypten = _import_crypten()
        if not _APPLIED:
            from crypten.encoder import FixedPointEncoder

            _ORIGINAL_DECODE = FixedPointEncoder.decode
            FixedPointEncoder.decode = _patched_decode
            _APPLIED = True
        return crypten


def original_decode() -> Any:
    """CrypTen 0.4.1's own ``FixedPointEncoder.decode`` (for tests showing what the fix changes)."""
    ensure_crypten()
    return _ORIGINAL_DECODE

"""pchmr's CrypTen 0.4.1 compatibility layer: version pin, import on torch 2.13, exact fixed-point decode.

The documented range: every fixed-point integer e with |e| < 2**24 decodes to exactly e / scale
(float32-exact; checked with a stride over the whole range), so encode → decode of every dyadic
x = e / scale round-trips exactly; the encoder round trip is checked on every multiple of 2⁻¹⁶ in
[−32, 32), where 0.4.1's own decode is 1.0 too low on negative values just above an integer
(e.g. −2.99998).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from pchmr.plugins.privacy.secagg import crypten_compat
from pchmr.plugins.privacy.secagg.crypten_compat import (
    CRYPTEN_VERSION,
    CrypTenUnavailableError,
    CrypTenVersionError,
    check_version,
    decode_fixed_point,
)

needs_crypten = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten 0.4.1 is not installed")


def test_only_the_pinned_release_is_accepted():
    check_version(CRYPTEN_VERSION)
    with pytest.raises(CrypTenVersionError, match="written for crypten==0.4.1.*crypten 0.5.0 is installed"):
        check_version("0.5.0")
    with pytest.raises(CrypTenUnavailableError, match="pip install --no-deps crypten==0.4.1"):
        check_version(None)


def test_decode_matches_exact_division_on_the_documented_range():
    for bits in (16, 24):
        scale = 2**bits
        e = torch.arange(-(2**24) + 1, 2**24, 7, dtype=torch.long)  # ≈ 4.8 M values, both signs
        decoded = decode_fixed_point(e, scale)
        assert decoded.dtype == torch.float32
        assert torch.equal(decoded.double(), e.double() / scale)


def test_decode_keeps_integers_at_scale_one_and_refuses_floats():
    e = torch.tensor([-3, 0, 5])
    assert torch.equal(decode_fixed_point(e, 1), e)
    with pytest.raises(TypeError, match="integer \\(LongTensor\\)"):
        decode_fixed_point(torch.tensor([1.5]), 2**16)


@needs_crypten
def test_import_works_and_leaves_no_placeholder_behind():
    crypten = crypten_compat.ensure_crypten()
    assert crypten.__name__ == "crypten"
    assert "torch.onnx._internal.registration" not in sys.modules
    assert crypten_compat.ensure_crypten() is crypten  # idempotent


@needs_crypten
def test_encoder_round_trips_every_dyadic_value_where_0_4_1_failed():
    crypten_compat.ensure_crypten()
    from crypten.encoder import FixedPointEncoder

    encoder = FixedPointEncoder(precision_bits=16)
    x = torch.arange(-(2**21), 2**21, dtype=torch.long).float() / 2**16  # every multiple of 2^-16 in [-32, 32)
    encoded = encoder.encode(x)
    assert torch.equal(encoded, (x.double() * 2**16).long())
    assert torch.equal(encoder.decode(encoded), x)
    wrong = crypten_compat.original_decode()(encoder, encoded) != x
    assert int(wrong.sum()) > 400  # 0.4.1's decode: exactly 1.0 too low on those (496 here)
    assert torch.all(crypten_compat.original_decode()(encoder, encoded)[wrong] == x[wrong] - 1.0)
    assert torch.all(x[wrong] < 0)


@needs_crypten
def test_the_value_from_the_bug_report():
    crypten_compat.ensure_crypten()
    from crypten.encoder import FixedPointEncoder

    encoder = FixedPointEncoder(precision_bits=16)
    encoded = encoder.encode(torch.tensor([-2.99998]))  # encode truncates toward zero: −196606
    assert int(encoded) == -196606
    assert float(encoder.decode(encoded)) == -196606 / 65536
    assert float(crypten_compat.original_decode()(encoder, encoded)) == pytest.approx(-196606 / 65536 - 1.0)

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


# ----------------------------------------------------------------------------- CrypTen is optional
@pytest.fixture
def without_crypten(monkeypatch):
    """CrypTen as on a machine that never installed it: no distribution, and ``import crypten`` fails
    (a ``None`` in ``sys.modules``); the backend module is imported afresh."""
    monkeypatch.setattr(crypten_compat, "_installed_version", lambda: None)
    monkeypatch.setitem(sys.modules, "crypten", None)
    monkeypatch.delitem(sys.modules, "pchmr.plugins.privacy.secagg.crypten", raising=False)


def _fedavg_parts():
    from flwr.serverapp.strategy import FedAvg

    from pchmr.core.contracts.strategy import StrategyParts
    from pchmr.core.kit.federation import flower_sampling_kwargs

    return StrategyParts(name="fedavg", server=FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples"))


def test_without_crypten_the_flower_backend_builds_and_the_crypten_backend_is_refused(without_crypten):
    from pchmr.core.contracts.errors import OptionError
    from pchmr.core.contracts.strategy import StrategyConfig
    from pchmr.plugins.privacy.secagg import secagg

    assert secagg(_fedavg_parts(), StrategyConfig(5, 2, 1, 0, {"backend": "flower"})).name == "fedavg+secagg"
    with pytest.raises(OptionError) as refused:
        secagg(_fedavg_parts(), StrategyConfig(5, 2, 1, 0, {"backend": "crypten"}))
    message = str(refused.value)
    assert message.startswith("secagg privacy option 'backend' crypten cannot run here: ")
    assert "pip install 'pchmr[crypten]' && pip install --no-deps crypten==0.4.1" in message
    assert "scripts/install.sh" in message


def test_another_crypten_release_is_refused_before_a_run(monkeypatch):
    from pchmr.core.contracts.errors import OptionError
    from pchmr.core.contracts.strategy import StrategyConfig
    from pchmr.plugins.privacy.secagg import secagg

    monkeypatch.setattr(crypten_compat, "_installed_version", lambda: "0.5.0")
    monkeypatch.delitem(sys.modules, "pchmr.plugins.privacy.secagg.crypten", raising=False)
    with pytest.raises(OptionError, match=r"crypten 0\.5\.0 is installed; install the pinned release: pip install"):
        secagg(_fedavg_parts(), StrategyConfig(5, 2, 1, 0, {"backend": "crypten"}))


def test_pchmr_run_refuses_the_crypten_backend_without_crypten_with_exit_2(without_crypten, tmp_path):
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    out = tmp_path / "run"
    args = ["run", "--strategy", "secagg", "--strategy-option", "backend=crypten", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "pip install 'pchmr[crypten]' && pip install --no-deps crypten==0.4.1" in " ".join(result.output.split())
    assert not out.exists()

"""Contract suite for attack plugins (:class:`~pchmr.core.contracts.attack.AttackFactory`).

An attack factory ``(options) -> Attack`` declares its options and ``attack.run(target)`` audits a
finished run through an :class:`~pchmr.core.contracts.attack.AuditTarget`. Subclass
:class:`AttackContract` and override the ``attack_factory`` fixture::

    import pytest
    from pchmr.testing import AttackContract, registered

    class TestMyAttack(AttackContract):
        @pytest.fixture(scope="class")
        @classmethod
        def attack_factory(cls):
            return registered("attack", "my-attack")

The target is the engine's own (:class:`~pchmr.core.engine.audit.RunAudit`) over a tiny finished
federated run the suite makes once per class (2 clients, 1 round, 24 synthetic samples, the CNN
from scratch; ~30 s on 2 cores): the attack meets real models, data, client updates and server
views. Other fixtures to override (class-scoped, written as classmethods like the above):

* ``options`` — options that make the attack quick on that run (default ``{}``);
* ``bad_options`` — ``{description: (options, regex)}``: each must raise ``OptionError``;
* ``known_gaps`` — ``{check name: reason}``: those checks run as ``xfail`` with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from pchmr.core.contracts.attack import THREAT_MODELS, Attack, AttackReport, AuditTarget
from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.options import declared_options, describe_options
from pchmr.testing.suite import ContractSuite, raises_matching

__all__ = ["AttackContract", "contract_run"]

#: An option key no attack knows.
UNKNOWN_OPTION = "contract-unknown-option"
#: The suite's run: small enough for a CI machine, federated so client updates and views exist.
CONTRACT_RUN = dict(
    num_train=24, num_test=8, clients=2, per_round=2, rounds=1, local_epochs=1, batch_size=8,
    encoder_weights="none", seed=0,
)  # fmt: skip


def contract_run(directory: Path) -> Path:
    """Make the suite's tiny finished federated run in ``directory`` (see the module docstring)."""
    from pchmr.core.engine.config import RunConfig
    from pchmr.core.engine.run import execute

    return execute(RunConfig(**CONTRACT_RUN), run_dir=directory).run_dir.path


class AttackContract(ContractSuite):
    """The checks every attack passes (see the module docstring for the fixtures)."""

    @pytest.fixture(scope="class")
    @classmethod
    def attack_factory(cls):
        raise NotImplementedError("override the attack_factory fixture: the attack's factory, e.g. registered(...)")

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls) -> Mapping[str, object]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {}

    @pytest.fixture(scope="class")
    def audit_run(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return contract_run(tmp_path_factory.mktemp("attack-contract") / "run")

    @pytest.fixture(scope="class")
    def target(self, audit_run: Path) -> AuditTarget:
        from pchmr.core.engine.audit import RunAudit

        return RunAudit(audit_run, seed=0)

    @pytest.fixture(scope="class")
    def report(self, attack_factory, options, target) -> AttackReport:
        return attack_factory(options).run(target)

    # -- options -----------------------------------------------------------------------------
    def test_declares_its_options(self, attack_factory) -> None:
        """The factory declares its options as ``factory.options``, each with its help text."""
        declared = declared_options(attack_factory)
        assert declared is not None, "an attack factory declares its options as factory.options"
        for info in describe_options(declared):
            assert info.help, f"option {info.key!r} has no help text"

    def test_rejects_an_unknown_option(self, attack_factory) -> None:
        """An option key it does not declare is refused with an OptionError naming the key."""
        raises_matching(
            lambda: attack_factory({UNKNOWN_OPTION: 1}), OptionError, UNKNOWN_OPTION, "an unknown attack option"
        )

    def test_rejects_bad_options(self, attack_factory, bad_options) -> None:
        """Each of ``bad_options`` is refused with an OptionError matching its pattern."""
        for description, (values, pattern) in bad_options.items():
            raises_matching(lambda v=values: attack_factory(v), OptionError, pattern, description)

    def test_builds_an_attack(self, attack_factory, options) -> None:
        """With ``options`` the factory returns an Attack (an object with ``run(target)``)."""
        assert isinstance(attack_factory(options), Attack)

    # -- the report --------------------------------------------------------------------------
    def test_reports_labelled_finite_measurements(self, report: AttackReport) -> None:
        """On the suite's run the report names its attack, a threat model and its assumptions, and
        every measurement its metric and setting, with a finite value inside its interval."""
        assert isinstance(report, AttackReport)
        assert report.attack and report.threat_model in THREAT_MODELS
        assert report.measurements, "an attack reports at least one measurement"
        for m in report.measurements:
            assert m.metric and m.setting, f"{m}: every number names its metric and setting"
            assert isinstance(m.value, float) and math.isfinite(m.value), f"{m}: a finite value"
            if m.low is not None or m.high is not None:
                assert m.low is not None and m.high is not None and m.low <= m.value <= m.high, f"{m}: interval"
            assert m.n >= 1
        assert report.assumptions, "an attack says what the attacker was given"

    def test_rows_are_json_and_pictures_are_images(self, report: AttackReport) -> None:
        """Rows and measurements serialise to JSON (audit.json); pictures are (H, W, 3) uint8."""
        json.dumps([dict(r) for r in report.rows])
        json.dumps([dataclasses.asdict(m) for m in report.measurements])
        for name, picture in report.pictures.items():
            assert isinstance(picture, np.ndarray) and picture.dtype == np.uint8, name
            assert picture.ndim == 3 and picture.shape[2] == 3, f"{name}: (H, W, 3), got {picture.shape}"

    def test_the_same_seed_gives_the_same_numbers(self, attack_factory, options, target, report) -> None:
        """A second run on the same target (the same audit seed) reports the same numbers."""
        again = attack_factory(options).run(target)
        assert [(m.metric, m.setting) for m in again.measurements] == [
            (m.metric, m.setting) for m in report.measurements
        ]
        for first, second in zip(report.measurements, again.measurements, strict=True):
            assert math.isclose(first.value, second.value, rel_tol=1e-5, abs_tol=1e-6), (first, second)

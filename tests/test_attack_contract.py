"""The built-in attacks pass the attack contract suite (pchmr.testing.attacks), on a real finished run."""

from __future__ import annotations

import pytest

from pchmr.core.engine.registry import get_registry
from pchmr.testing import AttackContract, registered

COVERED = ("membership", "inversion")  # the built-in attacks with a suite class below


def test_every_registered_builtin_attack_has_a_suite_class() -> None:
    builtins = {info.name for info in get_registry().infos("attack") if info.distribution == "pchmr"}
    assert builtins == set(COVERED), f"add a suite class for the built-in attacks {builtins - set(COVERED)}"


class TestMembership(AttackContract):
    @pytest.fixture(scope="class")
    @classmethod
    def attack_factory(cls):
        return registered("attack", COVERED[0])

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls):
        return {"candidates": 8, "shadows": 1, "shadow-samples": 8, "shadow-epochs": 1}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls):
        return {
            "too few candidates": ({"candidates": 2}, "'candidates' must be an integer >= 8"),
            "an unknown split": ({"nonmembers": "valid"}, "'nonmembers' must be one of"),
        }

    @pytest.fixture(scope="class")
    def audit_run(self, tiny_federated_run):
        return tiny_federated_run  # the session's, shared with tests/test_audit.py


class TestInversion(AttackContract):
    @pytest.fixture(scope="class")
    @classmethod
    def attack_factory(cls):
        return registered("attack", COVERED[1])

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls):  # every setting, two optimisation steps: the suite checks the report, not the recovery
        return {"victims": 1, "steps": 2, "k": 2, "noise-multipliers": "1", "settings": "plain,secagg,secagg-sum,dp"}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls):
        return {
            "an unknown setting": ({"settings": "plain,he"}, "'settings' must name some of plain, secagg"),
            "a negative noise multiplier": ({"noise-multipliers": "1,-2"}, "'noise-multipliers' must be numbers >= 0"),
            "no steps": ({"steps": 0}, "'steps' must be an integer >= 1"),
        }

    @pytest.fixture(scope="class")
    def audit_run(self, tiny_federated_run):
        return tiny_federated_run

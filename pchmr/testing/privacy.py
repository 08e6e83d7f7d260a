"""Contract suite for privacy plugins (:class:`~pchmr.core.contracts.strategy.PrivacyFactory`).

A privacy factory ``(parts, config) -> parts`` wraps the strategy it is given by appending its own
mechanisms (``parts.with_mechanism``) and, where it must see every reply on the server, wrapping
the server strategy (``parts.with_server``). Subclass :class:`PrivacyContract` and override the
``privacy_factory`` fixture::

    import pytest
    from pchmr.testing import PrivacyContract, registered

    class TestMyClip(PrivacyContract):
        @pytest.fixture(scope="class")
        @classmethod
        def privacy_factory(cls):
            return registered("privacy", "my-clip")

The suite wraps :func:`~pchmr.testing.wrapped.contract_strategy`: Flower's FedAvg weighted by
``num-examples`` plus :class:`~pchmr.testing.wrapped.InnerProbe`, a third party's mechanism the
privacy plugin knows nothing about. Rounds run as pchmr's runtime runs them
(:mod:`pchmr.testing.rounds`): 3 clients, all sampled, whose local training is a known small
update; the clients build their own parts. Other fixtures to override (class-scoped, written as
classmethods like the above):

* ``options`` — the privacy options of a valid run (default ``{}``);
* ``exact_options`` — options under which one round aggregates like the unwrapped strategy
  (noise off or negligible; default None: ``options`` already do);
* ``tolerance`` — how far (absolute, per float value) such a round may lie from the unwrapped
  strategy's, and a repeated round from the first (default 1e-6: float32 rounding);
* ``bad_options`` — ``{description: (options, regex)}``: each must raise ``OptionError``;
* ``refused_strategies`` — ``{built-in strategy: regex}``: the built-in strategies the plugin
  cannot wrap and the reason its ``IncompatibleError`` gives (default ``{}``: it wraps them all);
* capability flags: ``wraps_itself`` (False: wrapping its own output again is refused),
  ``equal_weights`` (False: True when every client counts once, whatever its ``num-examples``),
  ``adds_fresh_noise`` (False: True when every round draws noise the run's seed does not
  reproduce), ``flower_simulation`` (True: run the ~25 s real Flower simulation check);
* ``known_gaps`` — ``{check name: reason}``: those checks run as ``xfail`` with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping

import pytest

from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.options import declared_options, describe_options, read_options
from pchmr.core.contracts.strategy import IncompatibleError, PrivacyFactory, StrategyConfig, StrategyParts
from pchmr.core.engine.federation.mechanisms import MechanismRuntime
from pchmr.testing.rounds import (
    ContractClient,
    InProcessGrid,
    RoundOutcome,
    run_rounds,
    run_rounds_in_flower_simulation,
)
from pchmr.testing.strategies import CONTRACT_NODES, CONTRACT_ROUNDS, CONTRACT_SEED
from pchmr.testing.suite import ContractSuite, raises_matching
from pchmr.testing.wrapped import (
    InnerProbe,
    assert_same_state,
    builtin_strategies,
    check_aggregate,
    check_simulated_rounds,
    contract_strategy,
    inner_config,
    largest_difference,
    through_checkpoint,
    wrapped_parts,
)

__all__ = ["PrivacyContract"]

#: An option key no privacy plugin knows.
UNKNOWN_OPTION = "contract-unknown-option"
PartsMaker = Callable[[], StrategyParts]


def _one_round(make_parts: PartsMaker, num_examples: int | None = None) -> RoundOutcome:
    """Round 1 of fresh parts, their clients in one in-process client process of their own."""
    (outcome,) = run_rounds(make_parts(), InProcessGrid(ContractClient(make_parts, num_examples=num_examples)), 1)
    return outcome


# --------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------
class PrivacyContract(ContractSuite):
    """Checks every privacy plugin must pass; see the module docstring for the fixtures."""

    @pytest.fixture(scope="class")
    @classmethod
    def privacy_factory(cls) -> PrivacyFactory:
        raise NotImplementedError("override the privacy_factory fixture to return the privacy factory under test")

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls) -> Mapping[str, object]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def exact_options(cls) -> Mapping[str, object] | None:
        return None

    @pytest.fixture(scope="class")
    @classmethod
    def tolerance(cls) -> float:
        return 1e-6

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def refused_strategies(cls) -> Mapping[str, str]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def wraps_itself(cls) -> bool:
        return False

    @pytest.fixture(scope="class")
    @classmethod
    def equal_weights(cls) -> bool:
        return False

    @pytest.fixture(scope="class")
    @classmethod
    def adds_fresh_noise(cls) -> bool:
        return False

    @pytest.fixture(scope="class")
    @classmethod
    def flower_simulation(cls) -> bool:
        return True

    @pytest.fixture(scope="class")
    @classmethod
    def config(cls, options: Mapping[str, object]) -> StrategyConfig:
        """3 clients, all sampled every round, 2 rounds, seed 0, the privacy ``options``."""
        return StrategyConfig(CONTRACT_NODES, CONTRACT_NODES, CONTRACT_ROUNDS, CONTRACT_SEED, dict(options))

    @pytest.fixture(scope="class")
    @classmethod
    def make_parts(cls, privacy_factory: PrivacyFactory, config: StrategyConfig) -> PartsMaker:
        """Fresh wrapped parts per call (picklable: it reaches Ray's workers)."""
        return functools.partial(wrapped_parts, privacy_factory, config)

    # -- composition -----------------------------------------------------------------------
    def test_appends_its_mechanisms_after_the_inner_ones(
        self, privacy_factory: PrivacyFactory, config: StrategyConfig
    ) -> None:
        """The inner strategy's mechanisms stay, the same objects first and in order; at least one
        mechanism of its own is appended after them; names are unique; the inner parts are unchanged."""
        inner = contract_strategy(inner_config(config))
        before = inner.mechanisms
        wrapped = privacy_factory(inner, config)
        assert isinstance(wrapped, StrategyParts), f"the factory returned {type(wrapped).__name__}, not StrategyParts"
        assert inner.mechanisms is before, "the factory changed the parts it was given; return new ones"
        lost = [m.name for m in before if not any(kept is m for kept in wrapped.mechanisms)]
        assert not lost, f"the inner mechanisms {lost} were dropped or copied; compose with parts.with_mechanism(m)"
        assert all(kept is m for kept, m in zip(wrapped.mechanisms, before)), (
            f"the inner mechanisms must come first (appended after, not before): {[m.name for m in wrapped.mechanisms]}"
        )
        assert wrapped.mechanisms[len(before) :], "the factory appended no mechanism of its own"
        names = [m.name for m in wrapped.mechanisms]
        assert len(set(names)) == len(names), f"mechanism names must be unique: {names}"
        MechanismRuntime(wrapped)  # the runtime accepts them together (no clashing keys, one protocol)

    def test_names_the_wrapped_strategy_and_describes_itself_as_json(
        self, make_parts: PartsMaker, config: StrategyConfig
    ) -> None:
        """Its name contains the inner strategy's and differs from it; ``description()`` is JSON,
        lists its mechanisms by name, and at least one of them describes its settings."""
        inner_name, wrapped = contract_strategy(inner_config(config)).name, make_parts()
        assert inner_name in wrapped.name and wrapped.name != inner_name, (
            f"name the wrapped strategy after both (e.g. 'clip({inner_name})'), got '{wrapped.name}'"
        )
        description = wrapped.description()
        try:
            json.dumps(description)  # written into the run's config.json
        except TypeError as exc:
            raise AssertionError(f"description() is not JSON-able: {exc}") from exc
        added = wrapped.mechanisms[len(contract_strategy(inner_config(config)).mechanisms) :]
        listed = [m.get("name") for m in description["mechanisms"]]
        assert all(m.name in listed for m in added), f"description() lists {listed}, not {[m.name for m in added]}"
        assert any(m.describe() for m in added), "no appended mechanism describes its settings (describe() is empty)"

    # -- options ---------------------------------------------------------------------------
    def test_declares_its_options(
        self, privacy_factory: PrivacyFactory, options: Mapping[str, object], exact_options: Mapping[str, object] | None
    ) -> None:
        """``factory.options`` is the dataclass of its options: ``describe_options`` describes it and
        ``read_options`` reads the suite's ``options`` and ``exact_options`` with it."""
        declared = declared_options(privacy_factory)
        assert declared is not None, (
            "the factory declares no options: set factory.options to the frozen dataclass of its option() fields "
            "(pchmr.api.NoOptions for none)"
        )
        describe_options(declared)  # TypeError for a declaration the reader cannot read
        for values in (options, exact_options or {}):
            read_options(declared, values, plugin="contract", kind="privacy")

    def test_rejects_an_unknown_option(self, privacy_factory: PrivacyFactory, config: StrategyConfig) -> None:
        """An unknown key raises ``OptionError`` naming it in the reader's words (``has no option 'x'``)."""
        bad = dataclasses.replace(config, options={**config.options, UNKNOWN_OPTION: 1})
        raises_matching(lambda: wrapped_parts(privacy_factory, bad), OptionError,
                        rf"has no option '{UNKNOWN_OPTION}'", f"option {UNKNOWN_OPTION}=1")  # fmt: skip

    def test_rejects_bad_options(
        self,
        privacy_factory: PrivacyFactory,
        config: StrategyConfig,
        bad_options: Mapping[str, tuple[Mapping[str, object], str]],
    ) -> None:
        """Every ``bad_options`` entry raises ``OptionError`` matching its regex and quoting one of its keys."""
        for description, (values, pattern) in bad_options.items():
            bad = dataclasses.replace(config, options=dict(values))
            exc = raises_matching(lambda bad=bad: wrapped_parts(privacy_factory, bad), OptionError, pattern,
                                  f"{description} ({dict(values)})")  # fmt: skip
            keys = {form for key in values for form in (key, key.replace("_", "-"), key.replace("-", "_"))}
            assert any(f"'{key}'" in str(exc) for key in keys), f"{description}: {exc} quotes none of {sorted(values)}"

    # -- what it wraps ---------------------------------------------------------------------
    def test_refuses_exactly_the_declared_builtin_strategies(
        self, privacy_factory: PrivacyFactory, config: StrategyConfig, refused_strategies: Mapping[str, str]
    ) -> None:
        """Each built-in strategy of ``refused_strategies`` is refused with ``IncompatibleError``
        matching its reason; every other built-in strategy is wrapped into parts the runtime accepts."""
        from pchmr.core.engine.federation.common import quiet_flower
        from pchmr.testing.plugins import registered

        builtins = builtin_strategies()
        unknown = sorted(set(refused_strategies) - set(builtins))
        assert not unknown, f"refused_strategies names {unknown}, which are not built-in strategies {builtins}"
        for name in builtins:
            with quiet_flower():
                inner = registered("strategy", name)(inner_config(config))
            if name in refused_strategies:
                raises_matching(lambda inner=inner: privacy_factory(inner, config), IncompatibleError,
                                refused_strategies[name], f"wrapping the built-in strategy '{name}'")  # fmt: skip
                continue
            try:
                MechanismRuntime(privacy_factory(inner, config))
            except IncompatibleError as exc:
                pytest.fail(f"it refuses the built-in strategy '{name}' ({exc}); list it in refused_strategies")

    def test_wrapping_its_own_output_is_refused_or_stacks(
        self, privacy_factory: PrivacyFactory, make_parts: PartsMaker, config: StrategyConfig, wraps_itself: bool
    ) -> None:
        """Wrapped again by itself: ``IncompatibleError`` naming one of its mechanisms, or
        (``wraps_itself``) two layers with unique names whose round runs."""
        once = make_parts()
        own = [m.name for m in once.mechanisms[len(contract_strategy(inner_config(config)).mechanisms) :]]
        if not wraps_itself:
            try:
                privacy_factory(once, config)
            except IncompatibleError as exc:
                assert any(name in str(exc) for name in own), f"the refusal {exc!r} names none of its mechanisms {own}"
                return
            except Exception as exc:
                pytest.fail(f"wrapping its own output again raised {exc!r}, not IncompatibleError with the reason")
            pytest.fail("wrapping its own output again was accepted; declare wraps_itself=True if it stacks")

        def twice() -> StrategyParts:
            return privacy_factory(make_parts(), config)

        try:
            parts = twice()
            MechanismRuntime(parts)
        except Exception as exc:
            pytest.fail(f"wraps_itself is declared, but wrapping its own output again raised {exc!r}")
        (outcome,) = run_rounds(parts, InProcessGrid(ContractClient(twice)), 1)
        check_aggregate(outcome, "a round of the plugin wrapped twice")

    def test_the_inner_mechanisms_keep_working(self, make_parts: PartsMaker) -> None:
        """In a round of the wrapped strategy, the inner mechanism's train-config value reaches every
        client's ``transform_update``, and its round metric and state count the round."""
        parts, client = make_parts(), ContractClient(make_parts)
        (outcome,) = run_rounds(parts, InProcessGrid(client), 1)
        server_probe = parts.mechanism(InnerProbe.name)
        assert isinstance(server_probe, InnerProbe) and server_probe.state_dict() == {"rounds": 1}, (
            "the inner mechanism's before_round did not run once"
        )
        assert outcome.mechanism_metrics.get(InnerProbe.METRIC) == 1.0, (
            f"the inner mechanism's round metric is missing: {outcome.mechanism_metrics}"
        )
        seen = sorted(client.strategy.mechanism(InnerProbe.name).seen)  # type: ignore[attr-defined]
        expected = [(p, InnerProbe.VALUE) for p in range(CONTRACT_NODES)]
        assert seen == expected, (
            f"the inner mechanism's train-config value {InnerProbe.KEY}={InnerProbe.VALUE} must reach every client's "
            f"transform_update; (partition, value) seen: {seen}"
        )

    # -- what it aggregates ----------------------------------------------------------------
    def test_one_round_without_noise_aggregates_like_the_unwrapped_strategy(
        self,
        privacy_factory: PrivacyFactory,
        config: StrategyConfig,
        exact_options: Mapping[str, object] | None,
        tolerance: float,
        equal_weights: bool,
    ) -> None:
        """With ``exact_options``, one round's float entries lie within ``tolerance`` of the unwrapped
        strategy's on the same client updates (``equal_weights``: each client weighing 1); every
        entry keeps its shape, float entries their dtype."""
        exact = dataclasses.replace(config, options=dict(config.options if exact_options is None else exact_options))
        private = _one_round(functools.partial(wrapped_parts, privacy_factory, exact))
        plain = _one_round(functools.partial(contract_strategy, inner_config(config)), 1 if equal_weights else None)
        check_aggregate(private, "the wrapped strategy's round")
        diff, key = largest_difference(private.aggregate, plain.aggregate, plain.global_arrays)
        weights = "equal weights" if equal_weights else "num-examples weights"
        assert diff <= tolerance, (
            f"'{key}' lies {diff:.3g} from the unwrapped strategy's aggregate ({weights}), more than the "
            f"tolerance {tolerance:g}"
        )

    def test_a_repeated_round_differs_only_by_fresh_noise(
        self, make_parts: PartsMaker, tolerance: float, adds_fresh_noise: bool
    ) -> None:
        """The same round of the same updates, by two wrappings of the same config (same seed), is the
        same within ``tolerance``, or (``adds_fresh_noise``) differs: noise the seed reproduces,
        anyone holding the run's config.json can subtract."""
        first, second = _one_round(make_parts), _one_round(make_parts)
        diff, key = largest_difference(first.aggregate, second.aggregate, first.global_arrays)
        if adds_fresh_noise:
            assert diff > tolerance, "two runs of one seed gave the same noised aggregate: draw noise from the OS"
        else:
            assert diff <= tolerance, f"a repeated round differs in '{key}' by {diff:.3g} > {tolerance:g}"

    def test_state_and_round_metrics_survive_a_checkpoint(
        self, make_parts: PartsMaker, tolerance: float, adds_fresh_noise: bool
    ) -> None:
        """Fresh parts given the mechanisms' ``state_dict()`` after round 1 (through torch.save) report
        round 2's ``round_metrics`` and leave the state as the uninterrupted run does (and, without
        fresh noise, aggregate it alike within ``tolerance``)."""
        running = make_parts()
        (first,) = run_rounds(running, InProcessGrid(ContractClient(make_parts)), 1)
        resumed = make_parts()
        MechanismRuntime(resumed).load_state_dict(through_checkpoint(MechanismRuntime(running).state_dict()))
        after = {}
        for label, parts in (("uninterrupted", running), ("resumed", resumed)):
            grid = InProcessGrid(ContractClient(make_parts))
            (after[label],) = run_rounds(parts, grid, 1, first_round=2, arrays=first.next_global())
        assert after["resumed"].mechanism_metrics == after["uninterrupted"].mechanism_metrics, (
            f"round 2's metrics after resuming {after['resumed'].mechanism_metrics} != "
            f"uninterrupted {after['uninterrupted'].mechanism_metrics}"
        )
        assert_same_state(MechanismRuntime(resumed).state_dict(), MechanismRuntime(running).state_dict(), "state")
        if not adds_fresh_noise:
            diff, key = largest_difference(
                after["resumed"].aggregate, after["uninterrupted"].aggregate, first.aggregate
            )
            assert diff <= tolerance, f"round 2 after resuming differs in '{key}' by {diff:.3g}"

    def test_runs_in_flower_simulation(
        self, make_parts: PartsMaker, flower_simulation: bool, tolerance: float, adds_fresh_noise: bool
    ) -> None:
        """Two rounds on Flower's Simulation Engine (Ray, 3 nodes; clients build their own parts in
        their own process) agree with the same rounds in process (``flower_simulation``)."""
        if not flower_simulation:
            pytest.skip("the flower_simulation fixture is False (run once for several plugins elsewhere)")
        simulated = run_rounds_in_flower_simulation({"privacy": make_parts})["privacy"]
        in_process = run_rounds(make_parts(), InProcessGrid(ContractClient(make_parts)))
        check_simulated_rounds("privacy", simulated, in_process, tolerance, adds_fresh_noise)

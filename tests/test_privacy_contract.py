"""The privacy contract suite on every built-in privacy plugin, and proof that it can fail.

The built-ins run the suite with ``flower_simulation`` off; their real Flower simulation runs once
for all of them (one Ray start), together with a double that only that check can catch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.options import NoOptions, option, read_options
from pchmr.core.contracts.strategy import IncompatibleError, RoundResult, StrategyConfig, StrategyParts, UpdateInfo
from pchmr.core.engine.registry import get_registry
from pchmr.core.kit.federation import ordered_replies
from pchmr.testing.privacy import PrivacyContract
from pchmr.testing.rounds import (
    ContractClient,
    InProcessGrid,
    PartsMaker,
    RoundOutcome,
    run_rounds,
    run_rounds_in_flower_simulation,
)
from pchmr.testing.strategies import CONTRACT_NODES, CONTRACT_ROUNDS, CONTRACT_SEED
from pchmr.testing.wrapped import check_simulated_rounds, wrapped_parts

#: Refusal reasons of the built-ins.
INDIVIDUAL_UPDATES = r"compar\w* individual client updates"
#: Built-in case → its plugin, options and the fixtures the suite reads.
BUILTIN_CASES: dict[str, dict[str, Any]] = {
    "dp": {
        "plugin": "dp",
        "options": {},
        "exact_options": {"noise-multiplier": 1e-9},
        "equal_weights": True,
        "adds_fresh_noise": True,
        "refused_strategies": {"fedgh": INDIVIDUAL_UPDATES, "secagg": r"placement=server clips .* round protocol"},
        "bad_options": {
            "a zero clip": ({"clip": 0}, r"dp privacy option 'clip' must be a number > 0, got 0"),
            "an unknown placement": ({"placement": "edge"}, r"option 'placement' must be one of server, client"),
            "a placement at example level": (
                {"level": "example", "placement": "client"},
                r"option 'placement' applies to level=client",
            ),
        },
    },
    "dp-client-placement": {
        "plugin": "dp",
        "options": {"placement": "client"},
        "exact_options": {"placement": "client", "noise-multiplier": 1e-9},
        "equal_weights": True,
        "adds_fresh_noise": True,
        "refused_strategies": {"fedgh": INDIVIDUAL_UPDATES},
        "bad_options": {"a negative noise": ({"noise-multiplier": -1}, r"'noise-multiplier' must be a number > 0")},
    },
    "secagg-flower": {
        "plugin": "secagg",
        "options": {"backend": "flower"},
        "refused_strategies": {"fedgh": INDIVIDUAL_UPDATES, "secagg": r"already runs its own round protocol"},
        "bad_options": {
            "an unknown backend": ({"backend": "paillier"}, r"option 'backend' must be one of flower, crypten"),
            "a zero clipping range": ({"clipping-range": 0.0}, r"'clipping-range' must be a number > 0, got 0.0"),
        },
    },
}
# secagg's crypten backend is left out: the suite builds fresh parts for every round it runs, and
# each starts two CrypTen party processes (~11 s here); tests/test_secagg.py checks it against
# FedAvg with one pool of parties.


def test_every_registered_builtin_privacy_plugin_has_a_case() -> None:
    builtins = {info.name for info in get_registry().infos("privacy") if info.distribution == "pchmr"}
    covered = {case["plugin"] for case in BUILTIN_CASES.values()}
    assert builtins == covered, f"add a case for the built-in privacy plugins {builtins - covered}"


@pytest.mark.parametrize("case", sorted(BUILTIN_CASES), scope="class")
class TestBuiltinPrivacyPlugins(PrivacyContract):
    @pytest.fixture(scope="class")
    @classmethod
    def privacy_factory(cls, case: str) -> Any:
        return get_registry().get("privacy", BUILTIN_CASES[case]["plugin"])

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls, case: str) -> Mapping[str, object]:
        return BUILTIN_CASES[case]["options"]

    @pytest.fixture(scope="class")
    @classmethod
    def exact_options(cls, case: str) -> Mapping[str, object] | None:
        return BUILTIN_CASES[case].get("exact_options")

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls, case: str) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return BUILTIN_CASES[case]["bad_options"]

    @pytest.fixture(scope="class")
    @classmethod
    def refused_strategies(cls, case: str) -> Mapping[str, str]:
        return BUILTIN_CASES[case]["refused_strategies"]

    @pytest.fixture(scope="class")
    @classmethod
    def equal_weights(cls, case: str) -> bool:
        return BUILTIN_CASES[case].get("equal_weights", False)

    @pytest.fixture(scope="class")
    @classmethod
    def adds_fresh_noise(cls, case: str) -> bool:
        return BUILTIN_CASES[case].get("adds_fresh_noise", False)

    @pytest.fixture(scope="class")
    @classmethod
    def flower_simulation(cls) -> bool:
        return False  # once for all of them, below


# --------------------------------------------------------------------------------------
# The real Flower simulation, once for every built-in (and a double only it catches)
# --------------------------------------------------------------------------------------
def _builtin_maker(case: str) -> PartsMaker:
    config = StrategyConfig(
        CONTRACT_NODES, CONTRACT_NODES, CONTRACT_ROUNDS, CONTRACT_SEED, BUILTIN_CASES[case]["options"]
    )
    return functools.partial(wrapped_parts, get_registry().get("privacy", BUILTIN_CASES[case]["plugin"]), config)


def _double_maker(factory: Any) -> PartsMaker:
    return functools.partial(wrapped_parts, factory, StrategyConfig(CONTRACT_NODES, CONTRACT_NODES, CONTRACT_ROUNDS, 0))


def _in_process(make_parts: PartsMaker) -> list[RoundOutcome]:
    return run_rounds(make_parts(), InProcessGrid(ContractClient(make_parts)))


@pytest.fixture(scope="module")
def simulated() -> dict[str, list[RoundOutcome] | BaseException]:
    makers = {case: _builtin_maker(case) for case in BUILTIN_CASES}
    return run_rounds_in_flower_simulation({**makers, "shares-server-memory": _double_maker(shares_server_memory)})


@pytest.mark.parametrize("case", sorted(BUILTIN_CASES))
def test_builtin_privacy_plugins_run_in_one_flower_simulation(simulated: dict, case: str) -> None:
    noisy = BUILTIN_CASES[case].get("adds_fresh_noise", False)
    check_simulated_rounds(case, simulated[case], _in_process(_builtin_maker(case)), 1e-6, noisy)


def test_the_simulation_check_catches_a_mechanism_reading_server_memory_on_clients(simulated: dict) -> None:
    make_parts = _double_maker(shares_server_memory)
    in_process = _in_process(make_parts)  # in one process the client finds what the server stored
    with pytest.raises(
        AssertionError,
        match=r"failed in the Flower simulation: .*3 of 3 clients failed \(train\).*the round the server stored is not in",
    ):
        check_simulated_rounds("shares-server-memory", simulated["shares-server-memory"], in_process, 1e-6, False)


# --------------------------------------------------------------------------------------
# The suite must be able to fail: a plugin breaking each clause is caught by its check.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipOptions:
    max_norm: float = option(1.0, low=0.0, low_open=True, help="L2 bound of a client's update")


def _clipped(new: dict, old: dict, bound: float) -> dict:
    floats = [k for k, v in old.items() if v.is_floating_point()]
    norm = float(torch.sqrt(sum((new[k] - old[k]).double().square().sum() for k in floats)))
    scale = min(1.0, bound / max(norm, 1e-12))
    return {k: old[k] + scale * (new[k] - old[k]) if k in floats else new[k] for k in new}


class Clip(Mechanism):
    """Every client scales its update to L2 norm ≤ max_norm: passes every check."""

    name = "clip"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def describe(self) -> Mapping[str, Any]:
        return {"max-norm": self.max_norm}

    def transform_update(self, new_state: dict, global_state: dict, info: UpdateInfo) -> dict:
        return _clipped(new_state, global_state, self.max_norm)


def sound(parts: StrategyParts, config: StrategyConfig) -> StrategyParts:
    opts = read_options(ClipOptions, config.options, plugin="clip", kind="privacy")
    if any(isinstance(m, Clip) for m in parts.mechanisms):
        raise IncompatibleError(f"clip cannot wrap '{parts.name}': it already clips (mechanism 'clip')")
    return parts.with_mechanism(Clip(opts.max_norm), name=f"clip({parts.name})")


sound.options = ClipOptions  # type: ignore[attr-defined]


def drops_the_inner_mechanisms(parts, config):
    return StrategyParts(name=f"clip({parts.name})", server=parts.server, mechanisms=(Clip(),))


def prepends_its_mechanism(parts, config):
    return dataclasses.replace(parts, name=f"clip({parts.name})", mechanisms=(Clip(), *parts.mechanisms))


def keeps_the_inner_name(parts, config):
    return parts.with_mechanism(Clip())


class TensorDescribed(Clip):
    def describe(self) -> Mapping[str, Any]:
        return {"max-norm": torch.tensor(self.max_norm)}


def describes_a_tensor(parts, config):
    return parts.with_mechanism(TensorDescribed(), name=f"clip({parts.name})")


def parses_by_hand(parts, config):
    """No declared options; unknown and negative values pass unnoticed."""
    return parts.with_mechanism(Clip(float(config.option("max-norm", 1.0))), name=f"clip({parts.name})")


def leaves_duplicates_to_the_parts(parts, config):
    """Wrapped twice, StrategyParts refuses the second 'clip' with a ValueError that gives no reason."""
    return parts.with_mechanism(Clip(), name=f"clip({parts.name})")


leaves_duplicates_to_the_parts.options = NoOptions  # type: ignore[attr-defined]


class CountedClip(Clip):
    def __init__(self, layer: int) -> None:
        super().__init__()
        self.name = f"clip-{layer}"


def stacks(parts, config):
    """Wrapped again, it adds a second, uniquely named clip: sound for ``wraps_itself``."""
    layer = sum(isinstance(m, CountedClip) for m in parts.mechanisms) + 1
    return parts.with_mechanism(CountedClip(layer), name=f"clip({parts.name})")


stacks.options = NoOptions  # type: ignore[attr-defined]


class PlainExchange:
    """A round protocol that builds its own train config, losing the other mechanisms' values."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def run_round(self, grid: Any, server_round: int, arrays: Any, train_config: Any, timeout: float) -> RoundResult:
        from flwr.app import ConfigRecord

        messages = self.server.configure_train(server_round, arrays, ConfigRecord({"server-round": server_round}), grid)
        replies = ordered_replies(grid.send_and_receive(list(messages), timeout=timeout), grid, server_round)
        aggregate, _ = self.server.aggregate_train(server_round, replies)
        return RoundResult(aggregate, {}, 0, 0)


class Exchange(Clip):
    name = "exchange"

    def __init__(self, server: Any) -> None:
        super().__init__()
        self.protocol = PlainExchange(server)

    def round_protocol(self) -> PlainExchange:
        return self.protocol


def drops_the_train_config(parts, config):
    return parts.with_mechanism(Exchange(parts.server), name=f"exchange({parts.name})")


class Biased(Clip):
    def transform_update(self, new_state: dict, global_state: dict, info: UpdateInfo) -> dict:
        return {k: v + 0.01 if v.is_floating_point() else v for k, v in new_state.items()}


def biased(parts, config):
    return parts.with_mechanism(Biased(), name=f"clip({parts.name})")


class SeededNoise(Clip):
    """Noise from the run's seed: whoever holds config.json can subtract it."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def transform_update(self, new_state: dict, global_state: dict, info: UpdateInfo) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1000 + info.server_round * 10 + info.partition_id)
        return {k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                for k, v in new_state.items()}  # fmt: skip


def seeded_noise(parts, config):
    return parts.with_mechanism(SeededNoise(config.seed), name=f"noise({parts.name})")


class FreshNoise(Clip):
    def transform_update(self, new_state: dict, global_state: dict, info: UpdateInfo) -> dict:
        return {k: v + 0.01 * torch.randn(v.shape) if v.is_floating_point() else v for k, v in new_state.items()}


def fresh_noise(parts, config):
    return parts.with_mechanism(FreshNoise(), name=f"noise({parts.name})")


class Forgetful(Clip):
    """Counts rounds and reports the count, but keeps no state: a resumed run starts again at 1."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    def before_round(self, server_round: int) -> None:
        self.rounds += 1

    def round_metrics(self, server_round: int) -> Mapping[str, float]:
        return {"clip-rounds": float(self.rounds)}


def forgets_its_state(parts, config):
    return parts.with_mechanism(Forgetful(), name=f"clip({parts.name})")


#: What the server's mechanism stores for its clients: works in one process, not in Ray's workers.
_SERVER_MEMORY: dict[str, int] = {}


class SharesServerMemory(Clip):
    def before_round(self, server_round: int) -> None:
        _SERVER_MEMORY["round"] = server_round

    def transform_update(self, new_state: dict, global_state: dict, info: UpdateInfo) -> dict:
        if "round" not in _SERVER_MEMORY:
            raise KeyError("the round the server stored is not in this process")
        return new_state


def shares_server_memory(parts, config):
    return parts.with_mechanism(SharesServerMemory(), name=f"clip({parts.name})")


SUITE_DEFAULTS: dict[str, Any] = {
    "options": {}, "exact_options": None, "tolerance": 1e-6, "bad_options": {}, "refused_strategies": {},
    "wraps_itself": False, "equal_weights": False, "adds_fresh_noise": False, "flower_simulation": False,
}  # fmt: skip


def _run(check: str, factory: Any, **fixtures: Any) -> None:
    """Call one check of the suite directly, with the suite's default fixtures and ``fixtures``."""
    values = {**SUITE_DEFAULTS, **fixtures, "privacy_factory": factory}
    values["config"] = StrategyConfig(CONTRACT_NODES, CONTRACT_NODES, CONTRACT_ROUNDS, 0, dict(values["options"]))
    values["make_parts"] = functools.partial(wrapped_parts, factory, values["config"])
    method = getattr(PrivacyContract(), check)
    method(**{name: values[name] for name in inspect.signature(method).parameters})


CHECKS = sorted(name for name in dir(PrivacyContract) if name.startswith("test_") and "simulation" not in name)


def test_a_plugin_that_stacks_passes_the_wrapping_check_when_it_says_so() -> None:
    _run("test_wrapping_its_own_output_is_refused_or_stacks", stacks, wraps_itself=True)


@pytest.mark.parametrize("check", CHECKS)
def test_a_sound_plugin_passes(check: str) -> None:
    _run(check, sound, bad_options={"a zero bound": ({"max-norm": 0}, r"'max-norm' must be a number > 0, got 0")})


@pytest.mark.parametrize(
    ("flawed", "check", "fixtures", "message"),
    [
        (drops_the_inner_mechanisms, "test_appends_its_mechanisms_after_the_inner_ones", {}, r"\['contract-inner'\] were dropped or copied"),
        (prepends_its_mechanism, "test_appends_its_mechanisms_after_the_inner_ones", {}, r"must come first"),
        (keeps_the_inner_name, "test_names_the_wrapped_strategy_and_describes_itself_as_json", {}, r"got 'contract-fedavg'"),
        (describes_a_tensor, "test_names_the_wrapped_strategy_and_describes_itself_as_json", {}, r"not JSON-able.*Tensor"),
        (parses_by_hand, "test_declares_its_options", {}, r"declares no options"),
        (parses_by_hand, "test_rejects_an_unknown_option", {}, r"no OptionError was raised"),
        (parses_by_hand, "test_rejects_bad_options", {"bad_options": {"a negative bound": ({"max-norm": -1}, "max-norm")}},
         r"a negative bound \(\{'max-norm': -1\}\): no OptionError"),
        (sound, "test_refuses_exactly_the_declared_builtin_strategies", {"refused_strategies": {"fedgh": "individual"}},
         r"wrapping the built-in strategy 'fedgh': no IncompatibleError"),
        (leaves_duplicates_to_the_parts, "test_wrapping_its_own_output_is_refused_or_stacks", {},
         r"raised ValueError\(.*two mechanisms named 'clip'.*not IncompatibleError"),
        (leaves_duplicates_to_the_parts, "test_wrapping_its_own_output_is_refused_or_stacks", {"wraps_itself": True},
         r"wraps_itself is declared, but wrapping its own output again raised ValueError"),
        (stacks, "test_wrapping_its_own_output_is_refused_or_stacks", {}, r"was accepted; declare wraps_itself=True"),
        (drops_the_train_config, "test_the_inner_mechanisms_keep_working", {}, r"seen: \[\(0, None\), \(1, None\), \(2, None\)\]"),
        (biased, "test_one_round_without_noise_aggregates_like_the_unwrapped_strategy", {}, r"lies 0.01 from the unwrapped"),
        (seeded_noise, "test_a_repeated_round_differs_only_by_fresh_noise", {"adds_fresh_noise": True}, r"same noised aggregate"),
        (fresh_noise, "test_a_repeated_round_differs_only_by_fresh_noise", {}, r"a repeated round differs"),
        (forgets_its_state, "test_state_and_round_metrics_survive_a_checkpoint", {},
         r"round 2's metrics after resuming \{.*'clip-rounds': 1.0\} != uninterrupted \{.*'clip-rounds': 2.0\}"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)  # fmt: skip
def test_the_suite_catches_a_broken_privacy_plugin(flawed: Any, check: str, fixtures: dict, message: str) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception), match=message):
        _run(check, flawed, **fixtures)

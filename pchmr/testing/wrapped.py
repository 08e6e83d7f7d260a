"""What the privacy suite wraps, and how it compares the rounds it runs (:mod:`pchmr.testing.rounds`).

:func:`contract_strategy` is ``contract-fedavg``: Flower's FedAvg weighted by ``num-examples``
plus an :class:`InnerProbe`, a third party's mechanism a privacy plugin knows nothing about and
must keep working. :func:`wrapped_parts` wraps it with a privacy factory (a module-level function,
so a ``functools.partial`` of it reaches Ray's workers). The comparisons assert on
:class:`~pchmr.testing.rounds.RoundOutcome`\\ s and name what differs.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.strategy import PrivacyFactory, StrategyConfig, StrategyParts, UpdateInfo
from pchmr.core.kit.federation import flower_sampling_kwargs
from pchmr.testing.rounds import RoundOutcome

__all__ = [
    "InnerProbe",
    "assert_same_state",
    "builtin_strategies",
    "check_aggregate",
    "check_simulated_rounds",
    "contract_strategy",
    "inner_config",
    "largest_difference",
    "through_checkpoint",
    "wrapped_parts",
]


class InnerProbe(Mechanism):
    """A third party's mechanism inside the wrapped strategy: a train-config value, a round count
    as its state and round metric, and (on clients) a record of the value each update saw."""

    name = "contract-inner"
    KEY, VALUE, METRIC = "contract-inner-value", 7, "contract-inner-rounds"

    def __init__(self) -> None:
        self.rounds = 0
        self.seen: list[tuple[int, Any]] = []

    def describe(self) -> Mapping[str, Any]:
        return {"probe": True}

    def before_round(self, server_round: int) -> None:
        self.rounds += 1

    def train_config(self) -> Mapping[str, Any]:
        return {self.KEY: self.VALUE}

    def round_metrics(self, server_round: int) -> Mapping[str, float]:
        return {self.METRIC: float(self.rounds)}

    def state_dict(self) -> Mapping[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = int(state["rounds"])

    def transform_update(self, new_state: dict, global_state: dict, info: UpdateInfo) -> dict:
        self.seen.append((info.partition_id, info.config.get(self.KEY)))
        return new_state


def contract_strategy(config: StrategyConfig) -> StrategyParts:
    """``contract-fedavg``: Flower's FedAvg weighted by ``num-examples``, with an :class:`InnerProbe`."""
    from flwr.serverapp.strategy import FedAvg

    from pchmr.core.engine.federation.common import quiet_flower

    with quiet_flower():  # Flower warns that fraction_evaluate=0 skips federated evaluation
        server = FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples")
    return StrategyParts(
        name="contract-fedavg", server=server, mechanisms=(InnerProbe(),), describe={"server": "FedAvg"}
    )


def inner_config(config: StrategyConfig) -> StrategyConfig:
    return dataclasses.replace(config, options={})


def wrapped_parts(privacy_factory: PrivacyFactory, config: StrategyConfig) -> StrategyParts:
    """:func:`contract_strategy` built for ``config`` (without options), wrapped by ``privacy_factory``
    with ``config`` (a module-level function, so ``functools.partial`` of it reaches Ray's workers)."""
    return privacy_factory(contract_strategy(inner_config(config)), config)


def builtin_strategies() -> list[str]:
    """The names of the strategies pchmr itself registers."""
    from pchmr.core.engine.registry import get_registry

    return sorted(info.name for info in get_registry().infos("strategy") if info.distribution == "pchmr")


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------
def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def largest_difference(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray]
) -> tuple[float, str]:
    """max |a − b| over the float entries of ``model`` (the global model), and the entry where it is."""
    worst = (0.0, "")
    for key in float_keys(model):
        diff = float(np.max(np.abs(np.asarray(a[key], np.float64) - np.asarray(b[key], np.float64)), initial=0.0))
        worst = max(worst, (diff, key))
    return worst


def check_aggregate(outcome: RoundOutcome, what: str) -> None:
    """The aggregate has the global model's entries and shapes, its float dtypes, finite values."""
    model = outcome.global_arrays
    assert sorted(outcome.aggregate) == sorted(model), f"{what}: entries {sorted(outcome.aggregate)} != {sorted(model)}"
    for key, value in outcome.aggregate.items():
        assert value.shape == model[key].shape, f"{what}: '{key}' changed shape {model[key].shape} → {value.shape}"
        assert np.all(np.isfinite(value)), f"{what}: '{key}' is not finite"
    for key in float_keys(model):
        assert outcome.aggregate[key].dtype == model[key].dtype, f"{what}: '{key}' changed dtype"


def through_checkpoint(states: Mapping[str, Any]) -> Any:
    """``states`` after torch.save / torch.load, as a checkpoint keeps them."""
    import torch

    from pchmr.core.kit.safe_pickle import checkpoint_values

    buffer = io.BytesIO()
    torch.save(checkpoint_values(dict(states)), buffer)  # as RunDir.save_checkpoint writes it
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)  # as a resume reads it


def assert_same_state(a: Any, b: Any, where: str) -> None:
    """``a`` equals ``b``: mappings key by key, sequences item by item, tensors and arrays value by
    value (NaN equal to NaN), anything else with ``==``."""
    import torch

    if isinstance(b, Mapping):
        assert isinstance(a, Mapping) and sorted(map(str, a)) == sorted(map(str, b)), f"{where}: {a!r} != {b!r}"
        for key in b:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, torch.Tensor | np.ndarray | np.generic):
        values = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, b)]
        same = values[0].shape == values[1].shape and np.array_equal(values[0], values[1], equal_nan=True)
        assert same, f"{where}: {a!r} != {b!r}"
    elif isinstance(b, list | tuple):
        assert isinstance(a, list | tuple) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN equals NaN here


def check_simulated_rounds(
    name: str,
    simulated: Sequence[RoundOutcome] | BaseException,
    in_process: Sequence[RoundOutcome],
    tolerance: float,
    adds_fresh_noise: bool,
) -> None:
    """A :func:`~pchmr.testing.rounds.run_rounds_in_flower_simulation` result against the same rounds
    run in process: as many rounds, well-formed aggregates that move the model, the same
    round-metric keys, and (without fresh noise) the same aggregates within ``tolerance`` and the
    same round metrics."""
    if isinstance(simulated, BaseException):
        raise AssertionError(f"{name} failed in the Flower simulation: {simulated!r}") from simulated
    assert len(simulated) == len(in_process), f"{name}: {len(simulated)} rounds ran, expected {len(in_process)}"
    for got, expected in zip(simulated, in_process):
        what = f"{name} round {got.server_round} in the Flower simulation"
        check_aggregate(got, what)
        assert largest_difference(got.aggregate, got.global_arrays, got.global_arrays)[0] > 0, (
            f"{what}: the model did not change"
        )
        assert sorted(got.mechanism_metrics) == sorted(expected.mechanism_metrics), (
            f"{what}: round metrics {sorted(got.mechanism_metrics)}, in process {sorted(expected.mechanism_metrics)}"
        )
        if not adds_fresh_noise:
            diff, key = largest_difference(got.aggregate, expected.aggregate, got.global_arrays)
            assert diff <= tolerance, f"{what}: '{key}' differs from the in-process round by {diff:.3g} > {tolerance:g}"
            assert got.mechanism_metrics == expected.mechanism_metrics, f"{what}: round metrics differ from in process"

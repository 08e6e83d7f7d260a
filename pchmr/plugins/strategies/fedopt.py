"""``fedopt``: adaptive server optimisers (Reddi et al., ICLR 2021) — Flower's FedAdam/FedYogi/FedAdagrad.

The server treats the weighted client average minus the global model as a pseudo-gradient
Δ_t = Σ_k p_k w_k − w_t (p_k ∝ the client's ``num-examples``) and takes one optimiser step:

* m_t = β₁ m_{t−1} + (1 − β₁) Δ_t                       (Adagrad: β₁ = 0, so m_t = Δ_t)
* v_t = v_{t−1} + Δ_t²                                  (adagrad)
  v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²                      (adam)
  v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)    (yogi)
* w_{t+1} = w_t + η_t m_t / (√v_t + τ), element-wise, with m_0 = v_0 = 0.

η_t = η except for ``adam``, where Flower multiplies η by Adam's bias correction
√(1 − β₂^{t+1}) / (1 − β₁^{t+1}) (t = server round, from 1) — Reddi et al.'s Algorithm 2 has no bias
correction. All of this is Flower's code; this module validates options, carries m_t and v_t
across checkpoints, casts the aggregate back to the model's float dtypes (Flower's FedAdam
returns float64 for a float32 model) and gives integer entries (BatchNorm's
``num_batches_tracked``) the clients' weighted average instead of an optimiser step (see
:func:`adapt_server_optimizer`). Clients train with pchmr's own optimiser and ``--lr``; Flower's
client learning rate ``eta_l`` is not used.

Options (``--strategy-option key=value``), defaults are Flower's for the chosen optimiser:

=======================  ===================================  =====================
``server-opt``           ``adam`` | ``yogi`` | ``adagrad``    ``adam``
``server-learning-rate`` η > 0                                adam 0.1, yogi 0.01, adagrad 0.1
``beta-1``               β₁ in [0, 1) (adam, yogi)            0.9
``beta-2``               β₂ in [0, 1) (adam, yogi)            0.99
``tau``                  τ > 0                                0.001
=======================  ===================================  =====================

The options (:class:`FedOptOptions`) and the server-optimiser pieces (:func:`read_server_optimizer`,
:func:`make_server_optimizer`, :class:`ServerOptimizerState`) are reused by :mod:`pchmr.plugins.strategies.fedgh`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.core.kit.federation import flower_sampling_kwargs

__all__ = [
    "SERVER_OPTIMIZERS",
    "FedOptOptions",
    "ServerOptimizer",
    "ServerOptimizerState",
    "adapt_server_optimizer",
    "fedopt",
    "load_server_optimizer_state",
    "make_server_optimizer",
    "read_server_optimizer",
    "server_optimizer_state",
]

#: ``server-opt`` values → Flower's strategy classes.
SERVER_OPTIMIZERS: Mapping[str, type[FedOpt]] = {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}
#: pchmr option name → Flower constructor argument.
_FLOWER_ARGUMENT = {"server-learning-rate": "eta", "beta-1": "beta_1", "beta-2": "beta_2", "tau": "tau"}
DEFAULT_SERVER_OPT = "adam"
#: Sample-count key clients put in their MetricRecord (pchmr's runtime and Flower agree on it).
NUM_EXAMPLES_KEY = "num-examples"


# --------------------------------------------------------------------------------------
# the server optimiser
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerOptimizer:
    """A validated server-optimiser choice; ``beta_1``/``beta_2`` are None for adagrad."""

    name: str
    eta: float
    tau: float
    beta_1: float | None = None
    beta_2: float | None = None

    @property
    def flower_class(self) -> type[FedOpt]:
        return SERVER_OPTIMIZERS[self.name]

    def flower_kwargs(self) -> dict[str, float]:
        kwargs = {"eta": self.eta, "tau": self.tau}
        if self.beta_1 is not None:
            kwargs["beta_1"] = self.beta_1
        if self.beta_2 is not None:
            kwargs["beta_2"] = self.beta_2
        return kwargs

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server-opt": self.name, "server-learning-rate": self.eta}
        if self.beta_1 is not None:
            out["beta-1"] = self.beta_1
        if self.beta_2 is not None:
            out["beta-2"] = self.beta_2
        out["tau"] = self.tau
        return out


def flower_default(cls: type[FedOpt], option: str) -> float:
    """The default Flower's ``cls`` uses for a pchmr option (read from its signature)."""
    parameter = inspect.signature(cls.__init__).parameters[_FLOWER_ARGUMENT[option]]
    return float(parameter.default)


def _default_text(option_key: str) -> str:
    """A server-optimiser option's Flower defaults, for ``pchmr plugins --options``."""
    defaults = {
        name: f"{flower_default(cls, option_key):g}"
        for name, cls in SERVER_OPTIMIZERS.items()
        if _FLOWER_ARGUMENT[option_key] in inspect.signature(cls.__init__).parameters
    }
    if len(set(defaults.values())) == 1:
        value = next(iter(defaults.values()))
        return value if len(defaults) == len(SERVER_OPTIMIZERS) else f"{value} ({', '.join(defaults)})"
    return ", ".join(f"{name} {value}" for name, value in defaults.items())


@dataclass(frozen=True)
class FedOptOptions:
    """``--strategy-option`` values of ``fedopt``; an option left out takes Flower's default for the
    chosen server optimiser (:func:`read_server_optimizer`)."""

    server_opt: str = option(DEFAULT_SERVER_OPT, choices=tuple(SERVER_OPTIMIZERS), help="Flower's server optimiser")
    server_learning_rate: float | None = option(
        None, low=0.0, low_open=True, default_text=_default_text("server-learning-rate"), help="server step size η"
    )
    beta_1: float | None = option(
        None, low=0.0, high=1.0, high_open=True, default_text=_default_text("beta-1"), help="first-moment decay β₁"
    )
    beta_2: float | None = option(
        None, low=0.0, high=1.0, high_open=True, default_text=_default_text("beta-2"), help="second-moment decay β₂"
    )
    tau: float | None = option(None, low=0.0, low_open=True, default_text=_default_text("tau"), help="adaptivity τ")

    def __post_init__(self) -> None:
        cls = SERVER_OPTIMIZERS.get(self.server_opt)
        if cls is None:  # fedgh's "none": no server optimiser, its own rule
            return
        accepted = inspect.signature(cls.__init__).parameters
        for key in ("beta-1", "beta-2"):
            if getattr(self, key.replace("-", "_")) is not None and _FLOWER_ARGUMENT[key] not in accepted:
                raise ValueError(f"'{key}' applies to server-opt adam and yogi, not {self.server_opt}")


def read_server_optimizer(options: FedOptOptions) -> ServerOptimizer:
    """The :class:`ServerOptimizer` ``options`` choose (``server-opt`` one of :data:`SERVER_OPTIMIZERS`):
    options left out take the Flower class's defaults; β₁, β₂ are None for adagrad."""
    name = options.server_opt
    cls = SERVER_OPTIMIZERS[name]
    accepted = inspect.signature(cls.__init__).parameters

    def value(key: str, given: float | None) -> float:
        return flower_default(cls, key) if given is None else given

    betas: dict[str, float | None] = {}
    for key, given in (("beta-1", options.beta_1), ("beta-2", options.beta_2)):
        betas[key] = value(key, given) if _FLOWER_ARGUMENT[key] in accepted else None
    return ServerOptimizer(
        name=name,
        eta=value("server-learning-rate", options.server_learning_rate),
        tau=value("tau", options.tau),
        beta_1=betas["beta-1"],
        beta_2=betas["beta-2"],
    )


@functools.cache
def adapt_server_optimizer(cls: type[FedOpt]) -> type[FedOpt]:
    """A subclass of ``cls`` (a Flower FedOpt) whose optimiser step is Flower's, with two output fixes:

    * floating-point entries keep the global model's dtype: Flower's FedAdam scales its step by a
      numpy float64 (the bias correction), which would turn a float32 model into float64 (twice the
      bytes sent to clients and checkpointed);
    * other entries (counters such as BatchNorm's ``num_batches_tracked``) take the clients'
      weighted average, as in FedAvg, instead of an optimiser step meant for parameters; so do
      the floating-point entries a strategy names in ``averaged_keys()`` when it has that method
      (FedGH: buffers such as BatchNorm's running statistics, frozen parameters).

    m_t and v_t are Flower's (they also hold the counters' entries, unused).
    """

    def _compute_deltat_and_mt(self: Any, aggregated_arrayrecord: ArrayRecord) -> Any:
        self.client_average = aggregated_arrayrecord  # the average Flower steps from
        return cls._compute_deltat_and_mt(self, aggregated_arrayrecord)

    def aggregate_train(self: Any, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, Any]:
        self.client_average = None
        arrays, metrics = cls.aggregate_train(self, server_round, replies)
        average, self.client_average = self.client_average, None
        if arrays is None:
            return arrays, metrics
        if average is None:
            raise AggregationError(
                reason=f"{cls.__name__}.aggregate_train did not go through _compute_deltat_and_mt; "
                "pchmr.plugins.strategies.fedopt.adapt_server_optimizer needs updating for this Flower version"
            )
        out = {}
        averaged = self.averaged_keys() if hasattr(self, "averaged_keys") else frozenset()
        for key, array in arrays.items():
            like = self.current_arrays[key]
            if not np.issubdtype(like.dtype, np.floating) or key in averaged:
                out[key] = average[key]
                continue
            value = array.numpy()
            out[key] = Array(np.asarray(value if value.dtype == like.dtype else value.astype(like.dtype), order="C"))
        return ArrayRecord(out), metrics

    return type(
        cls.__name__,
        (cls,),
        {
            "aggregate_train": aggregate_train,
            "_compute_deltat_and_mt": _compute_deltat_and_mt,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__name__} keeping the model's float dtypes and averaging its integer entries.",
        },
    )


def make_server_optimizer(optimizer: ServerOptimizer, cls: type[FedOpt] | None = None, **kwargs: Any) -> FedOpt:
    """Flower's strategy for ``optimizer`` (or ``cls``, a subclass of it), training every offered node,
    adapted by :func:`adapt_server_optimizer`."""
    cls = cls or optimizer.flower_class
    if not issubclass(cls, optimizer.flower_class):
        raise TypeError(f"{cls.__name__} is not a subclass of {optimizer.flower_class.__name__}")
    return adapt_server_optimizer(cls)(
        **flower_sampling_kwargs(), weighted_by_key=NUM_EXAMPLES_KEY, **optimizer.flower_kwargs(), **kwargs
    )


def _arrays_to_torch(arrays: Mapping[str, np.ndarray] | None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in (arrays or {}).items()}


def _torch_to_arrays(tensors: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    out = {
        k: (v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v, copy=True))
        for k, v in tensors.items()
    }
    return out or None


def server_optimizer_state(server: FedOpt) -> dict[str, Any]:
    """FedOpt's state between rounds: the moments m_t and v_t (torch tensors; empty before round 1).

    ``current_arrays`` is not state: ``configure_train`` sets it from the global model every round.
    """
    return {"m_t": _arrays_to_torch(server.m_t), "v_t": _arrays_to_torch(server.v_t)}


def load_server_optimizer_state(server: FedOpt, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`server_optimizer_state`."""
    missing = {"m_t", "v_t"} - set(state)
    if missing:
        raise ValueError(
            f"server optimiser state lacks {sorted(missing)}; expected keys m_t and v_t, got {sorted(state)}"
        )
    server.m_t = _torch_to_arrays(state["m_t"])
    server.v_t = _torch_to_arrays(state["v_t"])


# --------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------
class ServerOptimizerState(Mechanism):
    """The server optimiser's state between rounds as a mechanism: ``state_dict`` is m_t, v_t and
    the optimiser's name (saved in every checkpoint), ``load_state_dict`` restores them and refuses
    the state of another server optimiser. Named after the strategy (``fedopt``, ``fedgh``)."""

    def __init__(self, server: FedOpt, optimizer: ServerOptimizer, strategy: str) -> None:
        self.name = strategy
        self.server = server
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"server-opt": self.optimizer.name, **server_optimizer_state(self.server)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("server-opt")
        if saved != self.optimizer.name:
            raise ValueError(
                f"the saved {self.name} state is for server-opt {saved!r}, this run uses {self.optimizer.name!r}"
            )
        load_server_optimizer_state(self.server, state)


def fedopt(config: StrategyConfig) -> StrategyParts:
    """Server: Flower's FedAdam, FedYogi or FedAdagrad (option ``server-opt``); the client adds nothing."""
    optimizer = read_server_optimizer(read_options(FedOptOptions, config.options, plugin="fedopt", kind="strategy"))
    server = make_server_optimizer(optimizer)
    return StrategyParts(
        name="fedopt",
        server=server,
        mechanisms=(ServerOptimizerState(server, optimizer, "fedopt"),),
        describe={"server": f"flwr.serverapp.strategy.{optimizer.flower_class.__name__}", **optimizer.describe()},
    )


fedopt.options = FedOptOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_strategies() -> dict[str, object]:
    return {"fedopt": fedopt}

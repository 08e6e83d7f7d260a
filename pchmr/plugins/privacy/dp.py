"""``dp``: differential privacy for federated HMR training, with RDP accounting.

Two levels (``--privacy-option level=client|example``):

* **client level** (default), DP-FedAvg with the fixed-weight estimator (McMahan et al., ICLR
  2018): each sampled client's update Δ_i = w_i − w_global (every floating tensor of the state
  that local training can change, parameters and BatchNorm statistics alike) is clipped to L2
  norm C; the new global model is ``w_global + (Σ_i clip(Δ_i) + N(0, (z·C)² I)) / k`` with k
  the clients sampled per round — a uniform average whose sensitivity to adding/removing one
  client is C/k. Two placements:

  - ``placement=server``: the server clips every reply and adds the noise (trusted server);
  - ``placement=client``: each client clips its own update and adds N(0, (z·C)²/k) before
    sending, so the sum of the k replies carries N(0, (z·C)²); composes with secure aggregation
    (the server only ever sees noised updates, or only their sum).

  In both placements the aggregation is the inner strategy's (FedAvg, FedProx, FedOpt …) run on
  the privatised updates with equal weights; FedOpt's server optimizer is post-processing.

* **example level** (the PCHMR paper's setting), DP-SGD inside each client's local training
  (Abadi et al. 2016): every example's gradient is clipped to C, the batch sum gets N(0, (z·C)²)
  and is divided by the batch size. Own per-example clipping (a loop of single-example
  backward passes: exact for any model, including the transformers' attention); BatchNorm mixes
  examples and is refused.

Accounting: :mod:`pchmr.core.kit.accounting` (RDP of the sampled Gaussian). Client level: one step
per round at q = k/N (``sampling-credit=false``: q = 1). Example level: per client, its local
steps at q = B/n_i in the rounds it took part in (no credit for client sampling); ε is the
maximum over clients. ε and δ go into every evaluated round's record; ``target-epsilon`` stops
the run before a round that would exceed it.

Integer tensors (BatchNorm's step counters) and the entries local training cannot change (a
frozen encoder's weights and BatchNorm statistics: :func:`pchmr.core.kit.state.fixed_state_keys`,
decided by the model's structure, never by the data) are not part of the released update: the
global model's values are kept, without noise. Noised running variances are clamped at 0
(post-processing). Client training metrics (loss, example counts) are not released either:
replies carry only ``num-examples = 1`` (equal weights) and the partition id.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.mechanism import Mechanism, RoundContext
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.strategy import (
    IncompatibleError,
    PrivacyBudgetExhausted,
    StrategyConfig,
    StrategyParts,
    UpdateInfo,
)
from pchmr.core.kit.accounting import RDPAccountant
from pchmr.core.kit.state import fixed_state_keys, training_mode

__all__ = [
    "DPOptions",
    "DPSGDStep",
    "DifferentialPrivacy",
    "FixedEntries",
    "ServerSideDP",
    "clip_update",
    "default_delta",
    "dp",
    "dp_fedavg_aggregate",
    "dp_overhead",
    "parse_options",
    "privatize_update",
]

PLACEMENTS = ("server", "client")
LEVELS = ("client", "example")
DEFAULT_CLIP = 1.0
DEFAULT_NOISE_MULTIPLIER = 1.0
#: δ is at most this (and below 1/N^1.1 for N protected units): the customary 1e-5
MAX_DEFAULT_DELTA = 1e-5
DELTA_EXPONENT = 1.1
_EPS = 1e-12
#: buffer names whose values must stay non-negative after noise (BatchNorm's running variance)
_VARIANCE_BUFFERS = frozenset({"running_var"})
#: train-config key a round protocol (secure aggregation) reads for its client weights; "uniform"
#: makes the revealed sum unweighted, as the noise calibration z·C/k requires
PROTOCOL_WEIGHTING_KEY = "secagg-weighting"


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPOptions:
    """``--privacy-option`` values of ``dp``; :func:`parse_options` resolves the ``None`` defaults
    (``placement`` is ``server`` at client level, ``delta`` follows the number of clients)."""

    level: str = option(
        "client", choices=LEVELS, help="client: DP-FedAvg on whole updates; example: DP-SGD in local training"
    )
    placement: str | None = option(
        None,
        choices=PLACEMENTS,
        default_text="server (level=client)",
        help="client level: the server clips and noises (trusted), or each client before sending",
    )
    clip: float = option(
        DEFAULT_CLIP, low=0.0, low_open=True, help="L2 bound C of a client update (client) or an example's gradient"
    )
    noise_multiplier: float = option(
        DEFAULT_NOISE_MULTIPLIER, low=0.0, low_open=True, help="z: Gaussian noise of standard deviation z·C"
    )
    delta: float | None = option(
        None,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        default_text="min(1e-5, 1/N^1.1)",
        help="δ of the (ε, δ) guarantee, N the protected units",
    )
    target_epsilon: float | None = option(
        None, low=0.0, low_open=True, help="stop the run before a round that would exceed this ε (none: no budget)"
    )
    sampling_credit: bool = option(True, help="client level: account for client sampling (q = k/N); false: q = 1")

    def __post_init__(self) -> None:
        if self.level == "example" and self.placement is not None:
            raise ValueError(
                "'placement' applies to level=client; example-level DP-SGD adds its noise in local training"
            )


def default_delta(units: int) -> float:
    """min(1e-5, 1/units^1.1): below 1/units (a δ ≥ 1/units allows releasing one unit's data
    outright), and no larger than the customary 1e-5 when there are few units."""
    return min(MAX_DEFAULT_DELTA, 1.0 / units**DELTA_EXPONENT)


def parse_options(options: Mapping[str, Any], config: StrategyConfig) -> DPOptions:
    """:class:`DPOptions` read from ``options`` (an :class:`~pchmr.core.contracts.errors.OptionError`
    naming the option and what is allowed), its ``None`` defaults resolved for ``config``."""
    opts = read_options(DPOptions, options, plugin="dp", kind="privacy")
    placement = (opts.placement or "server") if opts.level == "client" else None
    delta = default_delta(config.num_clients) if opts.delta is None else opts.delta
    return dataclasses.replace(opts, placement=placement, delta=delta)


# --------------------------------------------------------------------------------------
# client-level mechanism (pure tensor functions)
# --------------------------------------------------------------------------------------
def _released_keys(state: Mapping[str, Tensor], fixed: Collection[str] = ()) -> list[str]:
    """The entries a DP update covers: floating tensors that local training can change."""
    return [k for k, v in state.items() if v.is_floating_point() and k not in fixed]


def _nonnegative(key: str, value: Tensor) -> Tensor:
    """Post-processing (no privacy cost): a noised BatchNorm running variance stays ≥ 0, so
    ``sqrt(var + eps)`` stays real."""
    return value.clamp_(min=0.0) if key.rsplit(".", 1)[-1] in _VARIANCE_BUFFERS else value


def clip_update(
    new_state: Mapping[str, Tensor], global_state: Mapping[str, Tensor], clip: float, fixed: Collection[str] = ()
) -> tuple[dict[str, Tensor], float]:
    """The update Δ = new − global over the floating tensors not in ``fixed`` (entries training
    cannot change, :func:`~pchmr.core.kit.state.fixed_state_keys`), scaled to L2 norm ≤ ``clip``
    (float64), and Δ's norm before clipping."""
    missing = sorted(set(global_state) - set(new_state))
    if missing:
        raise KeyError(f"the client state lacks {missing[:3]} of the global model's entries")
    delta = {k: new_state[k].double() - global_state[k].double() for k in _released_keys(global_state, fixed)}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
    scale = min(1.0, clip / (norm + _EPS))
    return {k: d * scale for k, d in delta.items()}, norm


def privatize_update(
    new_state: Mapping[str, Tensor],
    global_state: Mapping[str, Tensor],
    clip: float,
    noise_std: float,
    generator: torch.Generator | None = None,
    fixed: Collection[str] = (),
) -> dict[str, Tensor]:
    """``global + clip(new − global) + N(0, noise_std²)`` on floating tensors; integer tensors and
    the ``fixed`` entries (which training cannot change) keep the global values. Running
    variances are clamped at 0 after the noise. Shapes and dtypes as ``global_state``."""
    clipped, _ = clip_update(new_state, global_state, clip, fixed)
    out: dict[str, Tensor] = {}
    for key, g in global_state.items():
        if key not in clipped:
            out[key] = g.clone()
            continue
        noise = torch.randn(g.shape, dtype=torch.float64, generator=generator) * noise_std if noise_std > 0 else 0.0
        out[key] = _nonnegative(key, g.double() + clipped[key] + noise).to(g.dtype)
    return out


def dp_fedavg_aggregate(
    global_state: Mapping[str, Tensor],
    client_states: Iterable[Mapping[str, Tensor]],
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    fixed: Collection[str] = (),
) -> dict[str, Tensor]:
    """The fixed-weight DP-FedAvg estimator in one place: ``global + (Σ clip(Δ_i) + N(0,(zC)²))/k``
    (``fixed`` entries and integer tensors keep the global values)."""
    states = list(client_states)
    k = len(states)
    if k == 0:
        raise ValueError("DP-FedAvg needs at least one client update")
    total = {
        key: torch.zeros(global_state[key].shape, dtype=torch.float64) for key in _released_keys(global_state, fixed)
    }
    for state in states:
        clipped, _ = clip_update(state, global_state, clip, fixed)
        for key in total:
            total[key] += clipped[key]
    out = {}
    for key, g in global_state.items():
        if key not in total:
            out[key] = g.clone()
            continue
        noise = torch.randn(g.shape, dtype=torch.float64, generator=generator) * (noise_multiplier * clip)
        out[key] = _nonnegative(key, g.double() + (total[key] + noise) / k).to(g.dtype)
    return out


def _secure_generator() -> torch.Generator:
    """A generator seeded from the OS's CSPRNG: noise must not be reproducible from the run seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass
class FixedEntries:
    """The model's entries local training cannot change (frozen encoder weights and its BatchNorm
    statistics), learnt from the module by ``prepare_module``. They carry no client data, keep
    the global values and get no noise: noising a frozen BatchNorm's running variance can make it
    negative and the model's output NaN. Empty until a module is seen (then everything floating
    is noised, the safe side)."""

    keys: frozenset[str] = frozenset()

    def learn(self, module: nn.Module) -> None:
        self.keys = fixed_state_keys(module)


# --------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------
class ServerSideDP:
    """Wraps a Flower Message-API strategy: privatises (server placement) or only equalises
    (client placement, example level) the replies, then lets the inner strategy aggregate them.

    Flower's ``DifferentialPrivacyServerSideFixedClipping`` is not used: it clips and noises
    every array, integer BatchNorm counters included, aggregates with the inner strategy's
    num-examples weights (noise calibrated for equal weights) and draws noise from NumPy's
    global generator; here the weights are equal, integer buffers keep the global values and the
    noise comes from a CSPRNG-seeded generator.
    """

    def __init__(
        self,
        inner: Any,
        options: DPOptions,
        per_round: int,
        on_replies: Callable[[list[Any]], None],
        fixed: FixedEntries | None = None,
    ) -> None:
        self.inner = inner
        self.options = options
        self.per_round = per_round
        self.on_replies = on_replies
        self.fixed = fixed or FixedEntries()
        self._global: dict[str, Tensor] | None = None

    def __getattr__(self, name: str) -> Any:  # everything else is the inner strategy's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def set_global(self, arrays: Any) -> None:
        """The round's global model (an ArrayRecord), against which updates are clipped."""
        self._global = arrays.to_torch_state_dict()

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        self.set_global(arrays)
        self._sent = list(self.inner.configure_train(server_round, arrays, config, grid))
        return list(self._sent)

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        """Equal weights; at client level, noise as calibrated. Fewer replies than the k sampled
        (clients that failed, tolerated by ``--min-fit-fraction``): at client level each missing
        one is replaced by a zero update carrying the noise share the missing client would have
        added, N(0, (z·C)²/k) (``dp-padded-updates`` in the round's metrics), so the estimator
        keeps its fixed denominator k and the sum its N(0, (z·C)²): the accountant's analysis
        (one sampled-Gaussian step at q = k/N) still holds, a dropped client contributing Δ = 0.
        At example level the replies are averaged as they are (each client's DP-SGD is its own)."""
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        replies = list(replies)
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train: the round's global model is unknown")
        if len(replies) > self.per_round or not replies:
            raise RuntimeError(
                f"round {server_round}: DP-FedAvg's noise is calibrated for {self.per_round} updates, got {len(replies)}"
            )
        self.on_replies(replies)
        generator = _secure_generator()
        std = self.options.noise_multiplier * self.options.clip / math.sqrt(self.per_round)
        pads = []
        if self.options.level == "client" and len(replies) < self.per_round:
            answered = {reply.metadata.src_node_id for reply in replies}
            missing = [m for m in getattr(self, "_sent", []) if m.metadata.dst_node_id not in answered]
            missing = missing[: self.per_round - len(replies)]
            if len(missing) != self.per_round - len(replies):
                raise RuntimeError(
                    f"round {server_round}: {len(replies)} of {self.per_round} updates arrived and the messages of "
                    "the missing clients are unknown: DP-FedAvg cannot pad them"
                )
            for message in missing:  # the server adds the missing clients' noise: both placements
                noise_only = privatize_update(
                    self._global, self._global, self.options.clip, std, generator, self.fixed.keys
                )
                content = RecordDict(
                    {
                        "arrays": ArrayRecord(noise_only),
                        "metrics": MetricRecord({"num-examples": 1.0, "partition-id": -1.0}),
                    }
                )
                pads.append(Message(content, reply_to=message))
        for reply in replies:
            if self.options.level == "client" and self.options.placement == "server":
                state = reply.content["arrays"].to_torch_state_dict()
                reply.content["arrays"] = ArrayRecord(
                    privatize_update(state, self._global, self.options.clip, std, generator, self.fixed.keys)
                )
            pid = reply.content["metrics"].get("partition-id", -1.0)
            reply.content["metrics"] = MetricRecord({"num-examples": 1.0, "partition-id": float(pid)})
        arrays, _ = self.inner.aggregate_train(server_round, [*replies, *pads])
        return arrays, (MetricRecord({"dp-padded-updates": float(len(pads))}) if pads else None)


def release_metrics_mod(extra: Callable[[], Mapping[str, float]] | None = None) -> Callable[..., Any]:
    """A client mod: a train reply's metrics become ``num-examples = 1`` (equal weights), the
    partition id and ``extra()`` (e.g. DP-SGD's step count) — the training loss and the local
    example count are not released."""

    def mod(msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        from flwr.app import MetricRecord

        reply = call_next(msg, context)
        if msg.metadata.message_type.startswith("train") and not reply.has_error() and "metrics" in reply.content:
            pid = reply.content["metrics"].get("partition-id", -1.0)
            released = {"num-examples": 1.0, "partition-id": float(pid), **dict(extra() if extra else {})}
            reply.content["metrics"] = MetricRecord(released)
        return reply

    return mod


# --------------------------------------------------------------------------------------
# example level: DP-SGD
# --------------------------------------------------------------------------------------
@dataclass
class _StepCount:
    steps: int = 0
    batch_size: int = 0
    examples: int = 0


def _example(batch: Any, i: int) -> Any:
    """Example ``i`` of a collated batch as a batch of one (tensors sliced, lists indexed, dicts recursed)."""
    if isinstance(batch, Tensor):
        return batch[i : i + 1]
    if isinstance(batch, Mapping):
        return {k: _example(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [batch[i]]
    return batch


class DPSGDStep:
    """DP-SGD's step (what :class:`DifferentialPrivacy`'s ``training_step`` returns): per-example
    clipped, noised gradient (Abadi et al. 2016).

    For a batch of B examples: g_i = ∇ loss(x_i) clipped to L2 norm C over all trainable
    parameters; ĝ = (Σ g_i + N(0, (z·C)² I)) / B. Returns the surrogate ``Σ_p ⟨p, ĝ_p⟩`` whose
    gradient is exactly ĝ, so Lightning's own backward and optimizer step apply it.
    """

    def __init__(self, clip: float, noise_multiplier: float, counter: _StepCount | None = None) -> None:
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.counter = counter or _StepCount()

    def privatized_gradient(self, module: nn.Module, batch: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        params = [p for p in module.parameters() if p.requires_grad]
        size = len(batch["image"])
        total = [torch.zeros_like(p) for p in params]
        loss_sum = torch.zeros(())
        for i in range(size):
            sample = _example(batch, i)
            loss = module.compute_losses(sample, module(sample["image"]))["loss"]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norm = torch.sqrt(sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros(())))
            scale = torch.clamp(self.clip / (norm + _EPS), max=1.0)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g * scale)
            loss_sum += loss.detach()
        generator = _secure_generator()
        noisy = [
            (acc + torch.randn(acc.shape, generator=generator) * (self.noise_multiplier * self.clip)) / size
            for acc in total
        ]
        return noisy, loss_sum / size

    def __call__(self, module: Any, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        gradient, loss = self.privatized_gradient(module, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"DP-SGD: training loss became {loss.item()} at batch {batch_idx}; lower the learning rate"
            )
        module.log("train/loss", loss, batch_size=len(batch["image"]))
        self.counter.steps += 1
        self.counter.batch_size = max(self.counter.batch_size, len(batch["image"]))
        params = [p for p in module.parameters() if p.requires_grad]
        return sum(((p * g.detach()).sum() for p, g in zip(params, gradient)), torch.zeros(()))


def check_per_example_safe(module: nn.Module) -> None:
    """IncompatibleError if a layer mixes examples of a batch: BatchNorm in training mode. A
    frozen pretrained CNN's BatchNorm stays in eval mode (running statistics, no gradients),
    where each example is normalised on its own, so it is allowed."""
    with training_mode(module):
        bad = [
            name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]
    if bad:
        raise IncompatibleError(
            f"example-level DP (DP-SGD) needs per-example gradients, but the model has {len(bad)} BatchNorm "
            f"layer(s) (first: {bad[0]}), which mix the examples of a batch; use an encoder with GroupNorm "
            "(backbone option encoder_norm=group), a frozen pretrained encoder (--freeze-encoder) or client-level DP "
            "(--privacy-option level=client)"
        )


# --------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------
class _Budget:
    """The run's accountant(s), the target check and the per-round ε record."""

    def __init__(self, options: DPOptions, config: StrategyConfig) -> None:
        self.options = options
        self.config = config
        self.client = RDPAccountant()  # client level
        self.examples: dict[int, RDPAccountant] = {}  # example level, per partition id
        self.q = config.per_round / config.num_clients if options.sampling_credit else 1.0

    def spent(self) -> float:
        if self.options.level == "client":
            return self.client.epsilon(self.options.delta)
        return max((acc.epsilon(self.options.delta) for acc in self.examples.values()), default=0.0)

    def before_round(self, server_round: int) -> None:
        target = self.options.target_epsilon
        if self.options.level == "client":
            if target is not None:
                after = self.client.epsilon_after(self.q, self.options.noise_multiplier, 1, self.options.delta)
                if after > target:
                    raise PrivacyBudgetExhausted(
                        f"privacy budget: round {server_round} would raise ε to {after:.4f} > target-epsilon {target:g} "
                        f"(δ={self.options.delta:.3g}); stopped after {server_round - 1} round(s) at ε={self.spent():.4f}"
                    )
            self.client.step(self.q, self.options.noise_multiplier)
        elif target is not None and self.spent() > target:
            raise PrivacyBudgetExhausted(
                f"privacy budget: example-level ε={self.spent():.4f} exceeds target-epsilon {target:g} "
                f"(δ={self.options.delta:.3g}) after {server_round - 1} round(s)"
            )

    def on_replies(self, replies: list[Any]) -> None:
        if self.options.level != "example":
            return
        for reply in replies:
            metrics = reply.content["metrics"]
            pid = int(metrics["partition-id"])
            q = float(metrics["dp-sample-rate"])
            self.examples.setdefault(pid, RDPAccountant()).step(
                q, self.options.noise_multiplier, int(metrics["dp-steps"])
            )

    def round_metrics(self, server_round: int) -> dict[str, float]:
        return {"epsilon": self.spent(), "delta": self.options.delta}

    def state(self) -> dict[str, Any]:
        return {
            "client": self.client.state_dict(),
            "examples": {str(p): a.state_dict() for p, a in self.examples.items()},
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.client.load_state_dict(state["client"])
        self.examples = {}
        for pid, acc_state in state.get("examples", {}).items():
            self.examples[int(pid)] = RDPAccountant()
            self.examples[int(pid)].load_state_dict(acc_state)


class DifferentialPrivacy(Mechanism):
    """dp's hooks (see the module docstring). Both levels: the accountant (``before_round``,
    ``round_metrics``, ``state_dict``) and a client mod releasing only equal weights, the partition
    id and, at example level, the DP-SGD step count and sample rate.

    * client level: ``prepare_module`` learns the entries training cannot change (kept un-noised);
      with ``placement=client``, ``transform_update`` clips the update to C and adds N(0, (z·C)²/k)
      before it leaves the client (``placement=server``: the wrapped server strategy does);
    * example level: ``prepare_module`` refuses BatchNorm in training mode and turns Lightning's
      gradient clipping off (the per-example clip replaces it); ``training_step`` is
      :class:`DPSGDStep`; ``transform_update`` records the client's example count.

    Over a round protocol, ``train_config`` asks it to sum the k noised updates unweighted.
    """

    name = "dp"

    def __init__(
        self, options: DPOptions, budget: _Budget, fixed: FixedEntries, over_protocol: bool, describe: Mapping[str, Any]
    ) -> None:
        self.options = options
        self.budget = budget
        self.fixed = fixed
        self.over_protocol = over_protocol
        self._describe = dict(describe)
        self.counter = _StepCount()
        self.step = (
            DPSGDStep(options.clip, options.noise_multiplier, self.counter) if options.level == "example" else None
        )

    def describe(self) -> Mapping[str, Any]:
        return self._describe

    def prepare_module(self, module: Any) -> None:
        self.fixed.learn(module)
        if self.step is not None:
            check_per_example_safe(module)
            module.optim = dataclasses.replace(module.optim, grad_clip=None)  # the per-example clip replaces it

    def before_round(self, server_round: int) -> None:
        self.budget.before_round(server_round)

    def round_metrics(self, server_round: int) -> Mapping[str, float]:
        return self.budget.round_metrics(server_round)

    def train_config(self) -> Mapping[str, Any]:
        return {PROTOCOL_WEIGHTING_KEY: "uniform"} if self.over_protocol else {}

    def state_dict(self) -> Mapping[str, Any]:
        return {"accountant": self.budget.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.budget.load(state["accountant"])

    def client_mods(self) -> Sequence[Callable[..., Any]]:
        return (release_metrics_mod(self._step_metrics if self.step is not None else None),)

    def training_step(
        self, module: Any, batch: Mapping[str, Tensor], batch_idx: int, context: RoundContext
    ) -> Tensor | None:
        return None if self.step is None else self.step(module, batch, batch_idx)

    def transform_update(
        self, new_state: dict[str, Tensor], global_state: dict[str, Tensor], info: UpdateInfo
    ) -> dict[str, Tensor]:
        if self.step is not None:
            self.counter.examples = info.num_examples
            return new_state
        if self.options.placement == "client":
            std = self.options.noise_multiplier * self.options.clip / math.sqrt(info.per_round)
            return privatize_update(
                new_state, global_state, self.options.clip, std, _secure_generator(), self.fixed.keys
            )
        return new_state

    def server_view(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        global_state: Mapping[str, Tensor],
        infos: Sequence[UpdateInfo],
        generator: torch.Generator | None = None,
    ) -> Any:
        """``pchmr audit``: client level, each client's upload as ``transform_update`` makes it
        (``placement=client``: clipped to C plus N(0, (z·C)²/k); ``placement=server``: clipped only,
        the server adds the noise to the sum, ``total``). Example level (DP-SGD noises the training,
        not the upload): None."""
        from pchmr.core.contracts.attack import ServerView

        if self.step is not None:
            return None
        generator = generator or _secure_generator()
        options = self.options
        states = [
            {k: g + update[k].to(g.dtype) if k in update else g for k, g in global_state.items()} for update in updates
        ]
        uploads = []
        for update, state, info in zip(updates, states, infos, strict=True):
            if options.placement == "client":
                std = options.noise_multiplier * options.clip / math.sqrt(info.per_round)
                sent = privatize_update(state, global_state, options.clip, std, generator, self.fixed.keys)
                uploads.append({k: sent[k].double() - global_state[k].double() for k in update})
            else:  # the server sees the clipped update and noises the sum
                delta, _ = clip_update(state, global_state, options.clip, self.fixed.keys)
                uploads.append({k: delta[k] for k in update if k in delta})
        total = None
        if options.placement == "server":
            released = dp_fedavg_aggregate(
                global_state, states, options.clip, options.noise_multiplier, generator, self.fixed.keys
            )
            total = {k: released[k].double() - global_state[k].double() for k in updates[0]}
        details = {"placement": options.placement, "noise_multiplier": options.noise_multiplier, "clip": options.clip}
        return ServerView("dp", tuple(uploads), total, details)

    def _step_metrics(self) -> dict[str, float]:
        """The client's DP-SGD steps since the last reply and its sample rate B/n_i (for the accountant)."""
        counter = self.counter
        out = {
            "dp-steps": float(counter.steps),
            "dp-sample-rate": min(1.0, counter.batch_size / max(counter.examples, 1)),
        }
        counter.steps = 0
        return out


def _refuse(parts: StrategyParts, options: DPOptions) -> bool:
    """IncompatibleError for what dp cannot wrap; True when ``parts`` run a round protocol."""
    if any(isinstance(m, DifferentialPrivacy) for m in parts.mechanisms):
        raise IncompatibleError(
            f"dp cannot wrap '{parts.name}': it already has differential privacy (mechanism 'dp'), and a second "
            "layer's accountant would not count the first layer's noise; apply dp once"
        )
    if parts.requires_individual_updates:
        raise IncompatibleError(
            f"dp cannot wrap '{parts.name}': it aggregates by comparing individual client updates, while "
            "DP-FedAvg's guarantee covers only functions of the clipped, noised sum"
        )
    over_protocol = any(m.round_protocol() is not None for m in parts.mechanisms)
    if over_protocol and options.level == "client" and options.placement == "server":
        raise IncompatibleError(
            f"dp placement=server clips each client's update on the server, which '{parts.name}''s round protocol "
            "(e.g. secure aggregation) never shows it; use --privacy-option placement=client"
        )
    if over_protocol and options.level == "example":
        raise IncompatibleError(
            f"example-level dp accounts each client's DP-SGD steps from its reply, which '{parts.name}''s round "
            "protocol hides; use level=client"
        )
    return over_protocol


def dp(parts: StrategyParts, config: StrategyConfig) -> StrategyParts:
    """Wrap ``parts`` with differential privacy (see the module docstring for the options): the
    server strategy in :class:`ServerSideDP`, and a :class:`DifferentialPrivacy` mechanism appended."""
    options = parse_options(config.options, config)
    over_protocol = _refuse(parts, options)
    budget = _Budget(options, config)
    fixed = FixedEntries()
    describe = {
        "privacy": "dp",
        "level": options.level,
        "placement": options.placement if options.level == "client" else "local DP-SGD",
        "clip": options.clip,
        "noise-multiplier": options.noise_multiplier,
        "delta": options.delta,
        "target-epsilon": options.target_epsilon,
        "sample-rate": budget.q if options.level == "client" else "B/n_i per client",
        "estimator": "fixed-weight: (sum of clipped updates + N(0,(zC)^2)) / k"
        if options.level == "client"
        else "DP-SGD: (sum of clipped per-example gradients + N(0,(zC)^2)) / B",
    }
    mechanism = DifferentialPrivacy(options, budget, fixed, over_protocol, describe)
    server = ServerSideDP(parts.server, options, config.per_round, budget.on_replies, fixed)
    name = f"dp({parts.name})"
    return parts.with_server(server).with_mechanism(mechanism, name=name)


# --------------------------------------------------------------------------------------
# benchmark helper
# --------------------------------------------------------------------------------------
def dp_overhead(num_params: int, per_round: int = 10, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Seconds of the server's aggregation work per round, plain FedAvg (uniform mean) vs DP-FedAvg
    (clip every update + Gaussian noise), for ``per_round`` updates of ``num_params`` float32
    values (one tensor); best of ``repeats``. Client placement moves the same clip+noise work to
    each client (one update each). Returns ``plain_s``, ``dp_s``, ``dp_minus_plain_s``."""
    generator = torch.Generator().manual_seed(seed)
    global_state = {"w": torch.randn(num_params, generator=generator)}
    states = [{"w": global_state["w"] + 0.01 * torch.randn(num_params, generator=generator)} for _ in range(per_round)]

    def plain() -> None:
        mean = sum(s["w"].double() for s in states) / per_round
        mean.float()

    def private() -> None:
        dp_fedavg_aggregate(global_state, states, clip=1.0, noise_multiplier=1.0, generator=generator)

    def best(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    plain_s, dp_s = best(plain), best(private)
    return {"plain_s": plain_s, "dp_s": dp_s, "dp_minus_plain_s": dp_s - plain_s}


dp.options = DPOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_privacy() -> dict[str, object]:
    return {"dp": dp}

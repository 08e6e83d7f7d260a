"""``pchmr audit``: a finished run as an attack sees it (:class:`RunAudit`, the engine's
:class:`~pchmr.core.contracts.attack.AuditTarget`), and the audit of one run by one attack.

Everything an attack may use comes from the run directory and the code the run ran:

* the models: ``model.pt`` (``final``) and the weights round 1 started from (``initial``: the run
  seed's initialisation, :meth:`Components.make_module`);
* the data: the run's training split (per client through ``partition.json``), its test split, and
  for the synthetic dataset fresh samples from the same distribution (another seed);
* a client's update: by the run's own local training (:func:`~pchmr.core.engine.federation.client.local_fit`,
  :meth:`client_round`), or as one differentiable AdamW computation (:meth:`client_update`: an
  attacker simulating a client, or one step on a chosen batch);
* what the server receives of k updates: ``plain`` (each update), or under a privacy plugin built
  through the registry with the run's strategy (``secagg``; ``dp`` at any noise multiplier),
  which says so itself (:meth:`~pchmr.core.contracts.mechanism.Mechanism.server_view`).

Random choices (which samples, noise, masks) come from the audit's seed.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from pchmr.core.contracts.attack import AttackReport, AuditSamples, ServerView
from pchmr.core.contracts.partition import load_partition
from pchmr.core.contracts.sample import denormalize_image
from pchmr.core.contracts.strategy import UpdateInfo
from pchmr.core.engine.components import Components, build_components, load_model_weights
from pchmr.core.engine.config import PUBLIC_DATASET, ConfigError, RunConfig
from pchmr.core.engine.rundir import RunDir
from pchmr.core.kit import metrics as kit_metrics
from pchmr.core.kit.seeds import derive_seed

__all__ = ["PLAIN", "SPLITS", "AuditError", "RunAudit", "report_json", "run_attack"]

SPLITS = ("train", "test", "fresh")
#: The setting of :meth:`RunAudit.server_view` without a privacy plugin (the others are plugin names).
PLAIN = "plain"
#: AdamW's defaults, as the run's clients use them (``torch.optim.AdamW``).
_BETAS = (0.9, 0.999)
_EPS = 1e-8
#: Fresh samples drawn at least (one rendering, cached, serves every later audit of the run).
FRESH_SAMPLES = 64
#: Streams of the audit's seed.
_SAMPLES, _FRESH, _VIEW, _SHADOW = 1, 2, 3, 4


class AuditError(ConfigError):
    """An audit that cannot run as asked (exit 2): the run, the split or the setting named."""


def _attention_for(differentiable: bool) -> Any:
    """The attention kernels a computation may use: a gradient kept differentiable (an attacker's
    second derivative) needs the math kernel; torch's fused CPU attention has no double backward."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if differentiable else nullcontext()


def _collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    batch = default_collate([{k: v for k, v in s.items() if k != "meta"} for s in samples])
    return {k: v for k, v in batch.items() if isinstance(v, Tensor)}


class RunAudit:
    """A finished run directory as an :class:`~pchmr.core.contracts.attack.AuditTarget`.

    ``cache_dir`` replaces the run's cache (another machine's path); ``seed`` is the audit's."""

    def __init__(self, run_dir: str | Path, seed: int = 0, cache_dir: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        rd = RunDir(self.run_dir)
        if not (self.run_dir / "config.json").is_file():
            raise AuditError(f"{self.run_dir} is not a pchmr run directory: it has no config.json")
        if not rd.model.is_file():
            raise AuditError(
                f"{self.run_dir} has no model.pt: audit a finished run (finish it with pchmr run --resume)"
            )
        run = dict(rd.read_config()["run"])
        self.init_from = run.get("init_from")
        run["init_from"] = None  # model.pt and the initialisation below hold every weight
        if cache_dir is not None:
            run["cache_dir"] = str(cache_dir)
        elif run.get("cache_dir") and not Path(str(run["cache_dir"])).is_dir():
            run["cache_dir"] = None
        self.config = RunConfig.from_saved(run)
        self.options: Mapping[str, Any] = dict(run)
        self.seed = int(seed)
        self._rd = rd
        self.components: Components = build_components(self.config)
        self.protocol: Mapping[str, Any] = dataclasses.asdict(self.components.protocol())
        self.partition = load_partition(rd.partition) if rd.partition.is_file() else None
        self._fresh: Components | None = None

    # -- models ------------------------------------------------------------------------------
    def global_model(self, which: str = "final") -> nn.Module:
        if which not in ("final", "initial"):
            raise AuditError(f"the global model is 'final' or 'initial', got {which!r}")
        if which == "initial" and self.init_from:
            raise AuditError(
                f"this run fine-tuned {self.init_from}: its initial weights are that model's, not in this directory; "
                "audit the final model"
            )
        module = self.components.make_module()
        if which == "final":
            load_model_weights(module, self._rd.model)
        return module.eval()

    def _trainable(self, model: nn.Module) -> dict[str, Tensor]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    # -- data --------------------------------------------------------------------------------
    def _fresh_components(self, size: int) -> Components:
        if self.config.dataset != PUBLIC_DATASET:
            raise AuditError(
                f"fresh samples (drawn anew from the data's distribution, for shadow and reference models) need a "
                f"dataset that draws its samples from a seed, {PUBLIC_DATASET}; this run's is {self.config.dataset}"
            )
        if self._fresh is None or len(self._fresh.data.train) < size:  # type: ignore[arg-type]
            # another seed: other bodies, poses, cameras and backgrounds of the same distribution (rendered
            # once per size and cached, as the run's own data)
            seed = derive_seed(self.config.seed, 9_000 + self.seed)
            count = max(FRESH_SAMPLES, size)
            fresh = dataclasses.replace(self.config, seed=seed, num_train=count, num_test=8)
            self._fresh = build_components(fresh, with_model=False)
        return self._fresh

    def samples(self, split: str, n: int, *, partition: int | None = None, offset: int = 0) -> AuditSamples:
        if split not in SPLITS:
            raise AuditError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if partition is not None and split != "train":
            raise AuditError(f"a partition holds training samples; split {split!r} has none")
        data = self._fresh_components(offset + n).data if split == "fresh" else self.components.data
        dataset = data.test if split == "test" else data.train
        if partition is not None:
            if self.partition is None or not 0 <= partition < len(self.partition.clients):
                known = len(self.partition.clients) if self.partition is not None else 0
                raise AuditError(f"partition must be a client of the run, 0..{known - 1}, got {partition}")
            pool = np.asarray(self.partition.clients[partition])
        else:
            pool = np.arange(len(dataset))  # type: ignore[arg-type]
        order = np.random.default_rng(derive_seed(self.seed, _SAMPLES, SPLITS.index(split))).permutation(pool)
        if partition is not None:
            order = np.sort(pool)  # the client's own samples, in the order it holds them
        chosen = order[offset : offset + n]
        if n < 1 or len(chosen) < n:
            raise AuditError(
                f"asked for {n} samples of split {split!r}"
                f"{f' (client {partition})' if partition is not None else ''} from {offset}; it has {len(order)}"
            )
        batch = _collate([dataset[int(i)] for i in chosen])
        return AuditSamples(batch, split, tuple(int(i) for i in chosen), partition)

    def _participation(self) -> dict[int, int]:
        """Client (partition) → rounds it trained in: ``rounds.jsonl`` for a federated run; the
        one client of a baseline's partition trained in every epoch."""
        if self.partition is None:
            raise AuditError(f"{self.run_dir} has no partition.json: which samples were trained on is unknown")
        if self.config.mode != "federated":
            return {0: 1}
        counts: dict[int, int] = {}
        for record in self._rd.read_rounds():
            for client in record.get("clients") or []:
                counts[int(client)] = counts.get(int(client), 0) + 1
        if not counts:
            raise AuditError(f"{self.run_dir}'s rounds.jsonl names no client that trained")
        return counts

    def member_samples(self, n: int) -> AuditSamples:
        counts = self._participation()
        pool = np.sort(np.concatenate([np.asarray(self.partition.clients[c]) for c in sorted(counts)]))
        chosen = np.random.default_rng(derive_seed(self.seed, _SAMPLES, 99)).permutation(pool)[:n]
        if n < 1 or len(chosen) < n:
            raise AuditError(f"asked for {n} member samples; the clients that trained hold {len(pool)}")
        data = self.components.data
        return AuditSamples(_collate([data.train[int(i)] for i in chosen]), "train", tuple(int(i) for i in chosen))

    def epochs_seen(self) -> int:
        counts = self._participation()
        if self.config.mode != "federated":
            return max(int(self.config.epochs), 1)
        sizes = {c: len(self.partition.clients[c]) for c in counts}
        mean = sum(sizes[c] * counts[c] for c in counts) / sum(sizes.values()) * self.config.local_epochs
        return max(round(mean), 1)

    # -- losses and errors -------------------------------------------------------------------
    def per_sample_loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        losses = []
        for i in range(len(batch["image"])):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            losses.append(model.compute_losses(one, model(one["image"]))["loss"])
        return torch.stack(losses)

    def pose_error_mm(self, model: nn.Module, images: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            aligned = model.aligned_for_metrics(batch, model(images))
        return kit_metrics.mpjpe(aligned.pred_joints, aligned.gt_joints, aligned.valid)

    def to_pixels(self, images: Tensor) -> np.ndarray:
        return denormalize_image(images.detach().cpu()).numpy()

    # -- a client's update -------------------------------------------------------------------
    def client_update(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int | None = None, differentiable: bool = False
    ) -> dict[str, Tensor]:
        """AdamW from a fresh state as ``torch.optim.AdamW`` steps (decoupled weight decay, bias
        correction), written functionally so the update can stay a function of the batch."""
        from torch.func import functional_call

        params = {k: v.detach().clone().requires_grad_(True) for k, v in self._trainable(model).items()}
        start = {k: v.detach().clone() for k, v in params.items()}
        buffers = dict(model.named_buffers())
        frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}
        lr, decay = self.config.lr, self.config.weight_decay
        size = len(batch["image"])
        if steps is None:
            width = self.config.batch_size
            chunks = [slice(i, i + width) for i in range(0, size, width)] * self.config.local_epochs
        else:
            chunks = [slice(0, size)] * steps
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v2 = {k: torch.zeros_like(v) for k, v in params.items()}
        for t, chunk in enumerate(chunks, start=1):
            part = {k: value[chunk] for k, value in batch.items()}
            with _attention_for(differentiable):
                out = functional_call(model, {**params, **frozen, **buffers}, (part["image"],))
                loss = model.compute_losses(part, out)["loss"]
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)
            new = {}
            for (name, p), g in zip(params.items(), grads, strict=True):
                m[name] = _BETAS[0] * m[name] + (1 - _BETAS[0]) * g
                v2[name] = _BETAS[1] * v2[name] + (1 - _BETAS[1]) * g * g
                m_hat = m[name] / (1 - _BETAS[0] ** t)
                v_hat = v2[name] / (1 - _BETAS[1] ** t)
                # sqrt's derivative at 0 is infinite: a floor far below eps keeps the values and a finite gradient
                new[name] = p * (1 - lr * decay) - lr * m_hat / (v_hat.clamp_min(1e-30).sqrt() + _EPS)
            params = new if differentiable else {k: v.detach().requires_grad_(True) for k, v in new.items()}
        return {k: params[k] - start[k] if differentiable else (params[k] - start[k]).detach() for k in params}

    def loss_gradient(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, differentiable: bool = False
    ) -> dict[str, Tensor]:
        params = self._trainable(model)
        with _attention_for(differentiable):
            loss = model.compute_losses(batch, model(batch["image"]))["loss"]
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)
        return {name: g if differentiable else g.detach() for name, g in zip(params, grads, strict=True)}

    def client_round(self, partition: int, which: str = "initial") -> tuple[dict[str, Tensor], AuditSamples]:
        from pchmr.core.engine.federation.client import _client_runtime, local_fit

        if self.partition is None or self.config.mode != "federated":
            raise AuditError("a client round needs a federated run (its partition.json names the clients)")
        held = self.samples("train", len(self.partition.clients[partition]), partition=partition)
        runtime = _client_runtime(str(self.run_dir.resolve()))
        model = self.global_model(which)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        config = {"server-round": 1, "local-epochs": self.config.local_epochs, "lr": self.config.lr}
        new_state, _ = local_fit(runtime, state, partition, 1, config)
        update = {k: (new_state[k] - state[k]).detach() for k in self._trainable(model)}
        return update, held

    # -- what the server receives ------------------------------------------------------------
    def server_view(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        setting: str,
        *,
        options: Mapping[str, object] | None = None,
        num_examples: Sequence[int] | None = None,
    ) -> ServerView:
        from pchmr.core.engine.registry import PluginError, get_registry

        if setting != PLAIN:
            try:
                get_registry().get("privacy", setting)
            except PluginError as exc:
                raise AuditError(f"setting must be {PLAIN!r} or a privacy plugin: {exc}") from None
        if not updates:
            raise AuditError("a server view needs at least one client update")
        counts = list(num_examples or [1] * len(updates))
        if setting == PLAIN:
            total = {k: sum(u[k] * n for u, n in zip(updates, counts, strict=True)) / sum(counts) for k in updates[0]}
            return ServerView(PLAIN, tuple(dict(u) for u in updates), total, {"clients": len(updates)})
        from pchmr.core.engine.federation.common import build_strategy

        if options is None:
            options = dict(self.config.privacy_options) if self.config.privacy == setting else {}
        per_round = max(len(updates), 2)
        config = dataclasses.replace(
            self.config, privacy=setting, privacy_options=dict(options), per_round=per_round,
            clients=max(self.config.clients, per_round), mode="federated",
        )  # fmt: skip
        try:
            parts = build_strategy(config)
        except ValueError as exc:  # a bad option or a strategy the plugin cannot wrap
            raise AuditError(f"privacy {setting!r} as the audit builds it: {exc}") from None
        mechanism = next((m for m in reversed(parts.mechanisms) if getattr(m, "name", "") == setting), None)
        module = self.global_model("final")
        if mechanism is None:
            raise AuditError(f"the {setting} privacy plugin added no mechanism named {setting!r}")
        mechanism.prepare_module(module)
        global_state = {k: v.detach() for k, v in module.state_dict().items()}
        infos = [UpdateInfo(1, i, int(n), config.clients, per_round, {"server-round": 1}) for i, n in enumerate(counts)]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _VIEW, zlib.crc32(setting.encode())))
        view = mechanism.server_view(list(updates), global_state, infos, generator)
        if view is None:
            raise AuditError(
                f"the {setting} mechanism does not say what the server receives (Mechanism.server_view); it cannot be "
                "audited as a setting"
            )
        return view

    # -- shadow and reference models ---------------------------------------------------------
    def train_model(self, batch: Mapping[str, Tensor], *, epochs: int, seed: int) -> nn.Module:
        """AdamW over ``batch`` in the run's batch size and learning rate for ``epochs`` epochs,
        shuffled from ``seed``, from the run's initial weights (train mode: dropout, as the run)."""
        model = self.components.make_module()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _SHADOW, seed))
        size, width = len(batch["image"]), self.config.batch_size
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.seed, _SHADOW, seed, 1))
            for _ in range(epochs):
                order = torch.randperm(size, generator=generator)
                for i in range(0, size, width):
                    index = order[i : i + width]
                    part = {k: v[index] for k, v in batch.items()}
                    loss = model.compute_losses(part, model(part["image"]))["loss"]
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        return model.eval()


def run_attack(attack: Any, target: RunAudit, progress: Callable[[str], None] | None = None) -> AttackReport:
    """``attack.run(target)`` timed; the report's seconds are the wall time."""
    start = time.perf_counter()
    report = attack.run(target, progress)
    return dataclasses.replace(report, seconds=time.perf_counter() - start)


def report_json(report: AttackReport, target: RunAudit) -> dict[str, Any]:
    """``audit.json``: the report without its pictures, with the run and its protocol."""
    out = {
        "attack": report.attack,
        "threat_model": report.threat_model,
        "run": str(target.run_dir),
        "protocol": target.protocol,
        "seed": target.seed,
        "assumptions": list(report.assumptions),
        "measurements": [dataclasses.asdict(m) for m in report.measurements],
        "rows": [dict(r) for r in report.rows],
        "pictures": sorted(report.pictures),
        "seconds": report.seconds,
    }
    json.dumps(out, allow_nan=True)  # refuses what JSON cannot hold, before anything is written
    return out

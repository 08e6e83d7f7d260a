"""``membership``: membership inference on a run's final global model (the model holder's view).

Was sample x in the training data? Two attacks score each candidate, members (training samples of
clients that trained in the run) against as many non-members (the test split, or fresh samples):

* ``loss`` (Yeom et al., 2018): score = −loss of x under the model. A model fits what it was
  trained on better, so members score higher.
* ``calibrated`` (per-example difficulty calibration, Watson et al., 2022; the offline reference
  models of Carlini et al.'s LiRA, 2022): score = mean loss of x under ``shadows`` reference models
  − its loss under the model. The reference models are trained like the run (its optimizer,
  learning rate, batch size, loss) on fresh samples of the same distribution that hold no
  candidate, for as many epochs as a member saw on average; subtracting what x costs a model that
  never saw it removes how hard x is in itself.

For each: the ROC AUC (0.5 is chance) with a 95 % bootstrap interval over the candidates, and the
true-positive rate at a false-positive rate of at most 1 % (``tpr@1%fpr``: the members scored above
the 99th percentile of the non-members; with fewer than 100 non-members, above all of them).

The attacker knows the model's weights, the training recipe and the data distribution (it can draw
fresh samples); it does not know which samples were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pchmr.core.contracts.attack import AttackReport, AuditTarget, Measurement
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options

__all__ = ["MembershipInference", "MembershipOptions", "auc", "tpr_at_fpr"]

BOOTSTRAP = 1000
FPR = 0.01


@dataclass(frozen=True)
class MembershipOptions:
    candidates: int = option(64, low=8, help="members, and as many non-members, scored")
    nonmembers: str = option(
        "fresh",
        choices=("fresh", "test"),
        help="where the non-members come from: fresh training-split samples (the members' distribution) or the test split",
    )
    shadows: int = option(4, low=0, help="reference models of the calibrated attack (0: the loss attack only)")
    shadow_samples: int | None = option(
        None,
        low=1,
        default_text="the run's training samples, at most 512",
        help="fresh samples each reference model trains on",
    )
    shadow_epochs: int | None = option(
        None, low=1, default_text="the epochs a member saw on average in the run", help="epochs of each reference model"
    )


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting one half (Mann-Whitney)."""
    scores = np.concatenate([members, nonmembers])
    ranks = _ranks(scores)
    m, n = len(members), len(nonmembers)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # average ranks of ties
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float = FPR) -> float:
    """The fraction of members scored above the threshold that lets at most ``fpr`` of the
    non-members through (the ⌈(1 − fpr)·n⌉-th smallest non-member score)."""
    allowed = math.floor(fpr * len(nonmembers))
    threshold = np.sort(nonmembers)[len(nonmembers) - allowed - 1]
    return float(np.mean(members > threshold))


def _bootstrap(members: np.ndarray, nonmembers: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    values = [auc(rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers))) for _ in range(BOOTSTRAP)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


class MembershipInference:
    """The attack, built with its options (see the module docstring)."""

    def __init__(self, options: MembershipOptions) -> None:
        self.options = options

    def run(self, target: AuditTarget, progress: Callable[[str], None] | None = None) -> AttackReport:
        say = progress or (lambda text: None)
        opts = self.options
        n = opts.candidates
        members = target.member_samples(n)
        outsiders = target.samples(opts.nonmembers, n)
        batch = {k: torch.cat([members.batch[k], outsiders.batch[k]]) for k in members.batch}
        model = target.global_model("final")
        say(f"scoring {2 * n} candidates")
        with torch.no_grad():
            loss = target.per_sample_loss(model, batch).double().numpy()
        labels = np.r_[np.ones(n), np.zeros(n)]
        scores = {"loss": -loss}
        reference = None
        if opts.shadows > 0:
            size = opts.shadow_samples or min(int(target.options.get("num_train") or 512), 512)
            epochs = opts.shadow_epochs or target.epochs_seen()
            target.samples("fresh", size * opts.shadows)  # draws them all at once (one rendering)
            losses = []
            for k in range(opts.shadows):
                say(f"reference model {k + 1}/{opts.shadows} ({size} fresh samples, {epochs} epochs)")
                fresh = target.samples("fresh", size, offset=k * size)
                shadow = target.train_model(fresh.batch, epochs=epochs, seed=k)
                with torch.no_grad():
                    losses.append(target.per_sample_loss(shadow, batch).double().numpy())
            reference = np.mean(losses, axis=0)
            scores["calibrated"] = reference - loss
        rng = np.random.default_rng(target.seed)
        measurements, setting = [], self._setting(target)
        for name, score in scores.items():
            inside, outside = score[labels == 1], score[labels == 0]
            low, high = _bootstrap(inside, outside, rng)
            notes = {"attack": name, "members": n, "nonmembers": n, "chance": 0.5}
            measurements.append(
                Measurement("auc", f"{setting} · {name}", auc(inside, outside), low, high, 2 * n, notes)
            )
            measurements.append(
                Measurement("tpr@1%fpr", f"{setting} · {name}", tpr_at_fpr(inside, outside), n=2 * n,
                            notes={**notes, "chance": FPR})
            )  # fmt: skip
        rows = tuple(
            {
                "split": "member" if labels[i] else opts.nonmembers,
                "id": int((members.ids + outsiders.ids)[i]),
                "loss": float(loss[i]),
                **({"reference_loss": float(reference[i])} if reference is not None else {}),
            }
            for i in range(2 * n)
        )
        assumptions = (
            "the attacker holds the final global model's weights and knows the training recipe",
            "it can draw fresh samples of the training distribution (the calibrated attack's reference models)",
            f"members are training samples of clients that trained; non-members come from the {opts.nonmembers} split",
        )
        return AttackReport("membership", "model-holder", tuple(measurements), assumptions, rows)

    @staticmethod
    def _setting(target: AuditTarget) -> str:
        privacy = target.options.get("privacy")
        if privacy == "dp":
            options = target.options.get("privacy_options") or {}
            return f"dp z={options.get('noise-multiplier', '?')}"
        return str(privacy or "no privacy")


def membership(options: Mapping[str, object]) -> MembershipInference:
    return MembershipInference(read_options(MembershipOptions, options, plugin="membership", kind="attack"))


membership.options = MembershipOptions  # type: ignore[attr-defined]


@hookimpl
def pchmr_attacks() -> dict[str, Any]:
    return {"membership": membership}

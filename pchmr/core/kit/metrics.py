"""HMR evaluation metrics and the protocol every reported number carries.

The functions take ``pred`` and ``target`` as (B, N, 3) tensors in **metres** that the caller has
already root-aligned the way its protocol says (see :func:`root_align`), and return per-sample
errors in **millimetres** (PCK: a fraction in [0, 1]). An optional ``valid`` (B, N) mask drops
missing joints; a sample with no valid joint gets NaN, which the torchmetrics classes skip.

* MPJPE    — mean per-joint position error;
* PA-MPJPE — MPJPE after a per-sample similarity Procrustes alignment (rotation, uniform scale,
  translation; least squares by SVD with the reflection fix, Umeyama 1991);
* MPVPE    — mean per-vertex position error (same formula on vertices);
* PCK@t    — fraction of joints whose error is below ``t`` metres (3DPCK uses 0.15 m).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "MPJPE",
    "MPVPE",
    "PAMPJPE",
    "PCK",
    "PCK_THRESHOLD_M",
    "MeanPerSampleError",
    "Protocol",
    "mpjpe",
    "mpvpe",
    "pa_mpjpe",
    "pck",
    "procrustes_align",
    "root_align",
]

#: 3DPCK's usual threshold (MPI-INF-3DHP): 150 mm.
PCK_THRESHOLD_M = 0.15
_M_TO_MM = 1000.0
_EPS = 1e-9


@dataclass(frozen=True)
class Protocol:
    """Everything a number needs beside it to be comparable.

    ``alignment`` is the root actually applied (with why, when a dataset's protocol asked for
    another); ``regressor`` where the evaluation joints come from (``h36m-17`` or the body
    model's own joint source) and ``gt_mesh`` the GT mesh kind (``gendered``, ``neutral``,
    ``none``) — both empty, and left out of :meth:`as_dict`, for data without a named protocol.
    """

    dataset: str
    joint_set: str
    alignment: str
    body_model: str
    ground_truth: str  # "real" or "pseudo"
    regressor: str = ""
    gt_mesh: str = ""

    def label(self) -> str:
        extra = "".join(f" · {k} {v}" for k, v in (("regressor", self.regressor), ("GT mesh", self.gt_mesh)) if v)
        return (
            f"{self.dataset} · {self.joint_set} · {self.alignment} aligned · "
            f"{self.body_model} · {self.ground_truth} GT{extra}"
        )

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v or k not in _OPTIONAL_PROTOCOL_FIELDS}


_OPTIONAL_PROTOCOL_FIELDS = ("regressor", "gt_mesh")


def _check(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"pred and target must both be (B, N, 3), got {tuple(pred.shape)} and {tuple(target.shape)}")


def root_align(points: Tensor, joints: Tensor, root: Sequence[int]) -> Tensor:
    """Subtract the mean of ``joints[:, root]`` (B, 1, 3) from ``points`` (B, N, 3)."""
    return points - joints[:, list(root)].mean(dim=1, keepdim=True)


def procrustes_align(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Similarity-align each ``pred`` (B, N, 3) to ``target``; returns the aligned ``pred``.

    Solves min_{s,R,t} Σ_i w_i ‖s R p_i + t − q_i‖² with R a proper rotation (det = +1), batched.
    """
    _check(pred, target)
    p, q = pred.double(), target.double()
    w = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device) if valid is None else valid.to(p.dtype)
    wsum = w.sum(dim=1, keepdim=True).clamp_min(_EPS)
    mu_p = (w[..., None] * p).sum(1, keepdim=True) / wsum[..., None]
    mu_q = (w[..., None] * q).sum(1, keepdim=True) / wsum[..., None]
    pc, qc = p - mu_p, q - mu_q
    cov = torch.einsum("bn,bni,bnj->bij", w, qc, pc)  # Σ w q p^T
    u, sigma, vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u @ vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    fix = torch.ones_like(sigma)
    fix[:, -1] = d
    rot = u @ torch.diag_embed(fix) @ vh
    var_p = (w * (pc**2).sum(-1)).sum(1)
    scale = (sigma * fix).sum(-1) / var_p.clamp_min(_EPS)
    aligned = scale[:, None, None] * pc @ rot.transpose(1, 2) + mu_q
    return aligned.to(pred.dtype)


def _per_sample_mean(err: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return err.mean(dim=1)
    v = valid.to(err.dtype)
    total = v.sum(dim=1)
    out = (err * v).sum(dim=1) / total.clamp_min(1.0)
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def mpjpe(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B,) mean joint error in mm of already-aligned (B, J, 3) metre tensors."""
    _check(pred, target)
    return _per_sample_mean(torch.linalg.norm(pred - target, dim=-1), valid) * _M_TO_MM


def pa_mpjpe(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B,) MPJPE in mm after per-sample Procrustes alignment of ``pred`` to ``target``."""
    return mpjpe(procrustes_align(pred, target, valid), target, valid)


def mpvpe(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B,) mean vertex error in mm of already-aligned (B, V, 3) metre tensors."""
    return mpjpe(pred, target, valid)


def pck(pred: Tensor, target: Tensor, valid: Tensor | None = None, threshold: float = PCK_THRESHOLD_M) -> Tensor:
    """(B,) fraction of joints within ``threshold`` metres."""
    _check(pred, target)
    hit = (torch.linalg.norm(pred - target, dim=-1) < threshold).to(pred.dtype)
    return _per_sample_mean(hit, valid)


class MeanPerSampleError(Metric):
    """Average of a per-sample metric over every sample seen (NaN samples skipped)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_sample(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        raise NotImplementedError

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:  # type: ignore[override]
        values = self.per_sample(pred.detach(), target.detach(), valid)
        keep = torch.isfinite(values)
        self.total += values[keep].double().sum()
        self.count += int(keep.sum())

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class MPJPE(MeanPerSampleError):
    def per_sample(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        return mpjpe(pred, target, valid)


class PAMPJPE(MeanPerSampleError):
    def per_sample(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        return pa_mpjpe(pred, target, valid)


class MPVPE(MeanPerSampleError):
    def per_sample(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        return mpvpe(pred, target, valid)


class PCK(MeanPerSampleError):
    higher_is_better = True

    def __init__(self, threshold: float = PCK_THRESHOLD_M, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def per_sample(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        return pck(pred, target, valid, self.threshold)

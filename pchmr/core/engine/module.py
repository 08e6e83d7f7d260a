"""HMRModule: the one training loop of pchmr (a LightningModule with the backbone injected).

Centralized training, naive single-device training, a federated client's local epochs and
on-device personalization all fit this module with a Lightning Trainer (pchmr.core.engine.trainer);
only the data and the strategy's mechanisms (e.g. FedProx's proximal term, DP-SGD's step) differ.
A federated client fits inside ``with module.round(context):``, which hands the mechanisms'
``loss`` and ``training_step`` hooks the :class:`~pchmr.core.contracts.mechanism.RoundContext`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from pchmr.core.contracts.backbone import Backbone, HMROutput
from pchmr.core.contracts.bodymodel import BodyModel, MeshPyramid
from pchmr.core.contracts.mechanism import Mechanism, RoundContext
from pchmr.core.engine.losses import LossWeights, level_weights_for, weighted_l1
from pchmr.core.engine.mesh_losses import edge_length_loss, normal_loss
from pchmr.core.kit.geometry import project_weak_perspective
from pchmr.core.kit.metrics import MPJPE, MPVPE, PAMPJPE, PCK

__all__ = ["AlignedPrediction", "HMRModule", "OptimConfig"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW as FastMETRO trains; ``lr`` per the PCHMR paper's Table 7 (1e-3 for FastMETRO-S)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 0.3  # FastMETRO clips gradients at 0.3

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay!r}")


@dataclass(frozen=True)
class AlignedPrediction:
    """One batch's prediction and ground truth, rooted as the evaluation protocol roots them
    (metres, camera-frame axes): what the metrics compare (:meth:`HMRModule.aligned_for_metrics`)."""

    pred_joints: Tensor  # (B, J, 3)
    gt_joints: Tensor  # (B, J, 3)
    valid: Tensor  # (B, J) 1 where the GT joint is annotated
    pred_vertices: Tensor  # (B, V, 3) the full mesh
    gt_vertices: Tensor  # (B, V, 3)
    has_mesh: Tensor  # (B,) bool: the sample has a GT mesh


class HMRModule(pl.LightningModule):
    """Trains and evaluates a :class:`~pchmr.core.contracts.backbone.Backbone` on Sample batches.

    Only the backbone's parameters (and BatchNorm statistics) are state; the body model is used
    for its joint regressor and pyramid, which are kept as non-persistent buffers, so
    ``state_dict()`` is exactly what federated clients exchange.

    ``mechanisms`` (a federated client's: the strategy's) add loss terms and may replace the
    training step; their hooks need a round, so such a module trains only inside
    :meth:`round`.
    """

    def __init__(
        self,
        backbone: Backbone,
        body_model: BodyModel,
        loss_weights: LossWeights | None = None,
        optim: OptimConfig | None = None,
        mechanisms: Sequence[Mechanism] = (),
        alignment: str = "mid-hip",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss_weights = loss_weights or LossWeights()
        self.optim = optim or OptimConfig()
        self.mechanisms: tuple[Mechanism, ...] = tuple(mechanisms)
        self._round: RoundContext | None = None
        self.root_joints = tuple(body_model.root_joints)
        self.pyramid: MeshPyramid = body_model.pyramid()
        self.register_buffer("joint_regressor", _regressor_matrix(body_model), persistent=False)
        #: evaluation root: "mid-hip" (the body model's root) or "pelvis" (Human3.6M's, see update_metrics)
        self.alignment = alignment
        #: evaluated samples with 3D joints but no GT pelvis, aligned at the mid-hip instead (pelvis
        #: alignment only; counted over every update_metrics call since construction)
        self.mid_hip_fallbacks = 0
        if alignment not in ("mid-hip", "pelvis"):
            raise ValueError(f"evaluation alignment must be 'mid-hip' or 'pelvis', got {alignment!r}")
        pelvis = getattr(body_model, "pelvis_regressor", None) if alignment == "pelvis" else None
        if alignment == "pelvis" and (not isinstance(pelvis, Tensor) or pelvis.numel() != body_model.num_vertices):
            raise ValueError(
                f"pelvis alignment needs the body model's Human3.6M pelvis row (pelvis_regressor, "
                f"{body_model.num_vertices} values); body model '{body_model.name}' has none"
            )
        if pelvis is not None:
            pelvis_row = pelvis.detach().reshape(-1).to(torch.float32).clone()
            self.register_buffer("pelvis_regressor", pelvis_row, persistent=False)
        level_weights_for(self.pyramid.levels, self.loss_weights.vertex_levels)
        levels = self.pyramid.levels
        if not -levels <= self.loss_weights.mesh_level < levels:
            raise ValueError(
                f"mesh_level {self.loss_weights.mesh_level} is not a level of the {levels}-level mesh pyramid"
            )
        self.mesh_level = self.loss_weights.mesh_level % levels
        known_terms = set(backbone.extra_loss_weights(0))
        unknown = sorted(set(self.loss_weights.extra) - known_terms)
        if unknown:
            raise ValueError(
                f"loss weights {unknown} name no loss term; this backbone adds {sorted(known_terms) or 'no terms'} to "
                "joints_3d, reg_joints_3d, vertices, joints_2d, edge, normal"
            )
        self.register_buffer("mesh_faces", self.pyramid.faces[self.mesh_level].clone(), persistent=False)
        self.val_metrics = nn.ModuleDict(
            {"mpjpe_mm": MPJPE(), "pa_mpjpe_mm": PAMPJPE(), "mpvpe_mm": MPVPE(), "pck": PCK()}
        )
        self.automatic_optimization = True

    # -- the federated round ---------------------------------------------------------------
    @contextmanager
    def round(self, context: RoundContext) -> Iterator[RoundContext]:
        """The block is one client's local fit in ``context``'s round: ``training_epoch`` counts from
        the round's start, and the mechanisms' ``loss``/``training_step`` receive ``context``."""
        if self._round is not None:
            raise RuntimeError(f"HMRModule is already fitting round {self._round.server_round}; rounds do not nest")
        self._round = context
        try:
            yield context
        finally:
            self._round = None

    @property
    def round_context(self) -> RoundContext | None:
        """The round being fitted (inside :meth:`round`), else None."""
        return self._round

    def _active_round(self, hook: str) -> RoundContext:
        if self._round is None:
            names = ", ".join(m.name for m in self.mechanisms)
            raise RuntimeError(
                f"HMRModule's mechanisms ({names}) need a round for their {hook} hooks; fit inside "
                "`with module.round(context):` (pchmr.core.engine.federation.client.local_fit does)"
            )
        return self._round

    # -- model ---------------------------------------------------------------------------
    def pyramid_on(self, device: torch.device) -> MeshPyramid:
        """The body model's mesh pyramid with its matrices on ``device`` (moved once per device:
        the pyramid is a constant of the module, not a buffer of its state)."""
        if self.pyramid.adjacency.device != device:
            self.pyramid = self.pyramid.to(device)
        return self.pyramid

    def forward(self, images: Tensor) -> HMROutput:
        return self.backbone(images)

    def regress_joints(self, vertices: Tensor) -> Tensor:
        return torch.einsum("jv,bvc->bjc", self.joint_regressor, vertices)

    def _root(self, joints: Tensor) -> Tensor:
        return joints[:, list(self.root_joints)].mean(dim=1, keepdim=True)

    # -- losses --------------------------------------------------------------------------
    def compute_losses(self, batch: Mapping[str, Tensor], out: HMROutput) -> dict[str, Tensor]:
        """Unweighted terms and the weighted ``loss``; see :mod:`pchmr.core.engine.losses`."""
        w = self.loss_weights
        gt_joints, joint_valid = batch["joints_3d"][..., :3], batch["joints_3d"][..., 3]
        has_mesh = batch["has_vertices"].to(gt_joints.dtype)

        pred_joints = out.joints - self._root(out.joints)
        full = out.vertices[-1]
        reg_joints = self.regress_joints(full)
        mesh_root = self._root(reg_joints)
        reg_joints = reg_joints - mesh_root

        terms: dict[str, Tensor] = {
            "joints_3d": weighted_l1(pred_joints, gt_joints, joint_valid),
            "reg_joints_3d": weighted_l1(reg_joints, gt_joints, joint_valid),
        }
        gt_full = batch["vertices"]
        pyramid = self.pyramid_on(gt_full.device)
        vertex_loss = full.new_zeros(())
        for level, level_weight in enumerate(w.vertex_levels):
            gt_level = gt_full if level == pyramid.levels - 1 else pyramid.downsample(gt_full, level)
            pred_level = out.vertices[level] - mesh_root
            mask = has_mesh[:, None].expand(-1, gt_level.shape[1])
            vertex_loss = vertex_loss + level_weight * weighted_l1(pred_level, gt_level, mask)
        terms["vertices"] = vertex_loss
        kp = batch["keypoints_2d"]
        terms["joints_2d"] = weighted_l1(project_weak_perspective(pred_joints, out.camera), kp[..., :2], kp[..., 2])
        if w.edge > 0 or w.normal > 0:
            level = self.mesh_level
            gt_mesh = gt_full if level == pyramid.levels - 1 else pyramid.downsample(gt_full, level)
            terms["edge"] = edge_length_loss(out.vertices[level], gt_mesh, self.mesh_faces, has_mesh)
            terms["normal"] = normal_loss(out.vertices[level], gt_mesh, self.mesh_faces, has_mesh)

        loss = (
            w.joints_3d * terms["joints_3d"]
            + w.reg_joints_3d * terms["reg_joints_3d"]
            + w.vertices * terms["vertices"]
            + w.joints_2d * terms["joints_2d"]
        )
        if "edge" in terms:
            loss = loss + w.edge * terms["edge"] + w.normal * terms["normal"]
        epoch = self.training_epoch
        base = self.backbone.extra_loss_weights(epoch)
        ramp = self.backbone.extra_loss_schedule(epoch)
        for name, value in self.backbone.extra_losses(out, batch).items():
            terms[name] = value
            loss = loss + w.extra.get(name, base.get(name, 1.0)) * ramp.get(name, 1.0) * value
        if self.mechanisms:
            context = self._active_round("loss")
            for mechanism in self.mechanisms:
                term = mechanism.loss(self, batch, out, context)
                if term is not None:
                    loss = loss + term
        terms["loss"] = loss
        return terms

    @property
    def training_epoch(self) -> int:
        """0-based epoch over the model's whole training: a federated client in round r with E
        local epochs is at ``(r - 1) * E`` + its local epoch (loss schedules depend on it)."""
        local = int(self.trainer.current_epoch) if self._trainer is not None else 0
        if self._round is None:
            return local
        return (self._round.server_round - 1) * self._round.local_epochs + local

    # -- Lightning hooks -----------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        if self.mechanisms:
            context = self._active_round("training_step")
            for mechanism in self.mechanisms:
                replaced = mechanism.training_step(self, batch, batch_idx, context)
                if replaced is not None:
                    return replaced
        out = self(batch["image"])
        terms = self.compute_losses(batch, out)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"training loss became {terms['loss'].item()} at batch {batch_idx}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                + "; lower the learning rate or check the data for NaN"
            )
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=len(batch["image"]))
        return terms["loss"]

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.update_metrics(batch, self(batch["image"]))

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": m.compute() for k, m in self.val_metrics.items()})
        for m in self.val_metrics.values():
            m.reset()

    def update_metrics(self, batch: Mapping[str, Tensor], out: HMROutput) -> None:
        """Evaluation protocol: joints regressed from the predicted full mesh, both sides root-aligned
        at the body model's root (mid-hip); vertices aligned at the same root.

        With ``alignment="pelvis"`` (SPIN/METRO) the prediction's root is its Human3.6M pelvis
        (``pelvis_regressor`` @ predicted mesh) and the GT's is ``batch["pelvis_3d"]``; GT vertices
        are aligned at their own regressed pelvis. Samples without a valid GT pelvis keep the
        mid-hip on both sides and are counted in :attr:`mid_hip_fallbacks`. PA-MPJPE does not
        depend on the root."""
        a = self.aligned_for_metrics(batch, out)
        self.val_metrics["mpjpe_mm"].update(a.pred_joints, a.gt_joints, a.valid)
        self.val_metrics["pa_mpjpe_mm"].update(a.pred_joints, a.gt_joints, a.valid)
        self.val_metrics["pck"].update(a.pred_joints, a.gt_joints, a.valid)
        if a.has_mesh.any():
            self.val_metrics["mpvpe_mm"].update(a.pred_vertices[a.has_mesh], a.gt_vertices[a.has_mesh])

    def aligned_for_metrics(self, batch: Mapping[str, Tensor], out: HMROutput) -> AlignedPrediction:
        """The prediction and the ground truth as :meth:`update_metrics` scores them: joints
        regressed from the full mesh, both sides rooted by the protocol's alignment."""
        pred_full = out.vertices[-1]
        pred_joints = self.regress_joints(pred_full)
        root = self._root(pred_joints)
        gt_joints, valid = batch["joints_3d"][..., :3], batch["joints_3d"][..., 3]
        gt_full = batch["vertices"]
        if self.alignment == "pelvis":
            root, gt_joints, gt_full = self._pelvis_aligned(batch, pred_full, root, gt_joints, gt_full, valid)
        return AlignedPrediction(
            pred_joints - root, gt_joints, valid, pred_full - root, gt_full, batch["has_vertices"] > 0
        )

    def _pelvis_aligned(
        self,
        batch: Mapping[str, Tensor],
        pred_full: Tensor,
        mid_hip: Tensor,
        gt_joints: Tensor,
        gt_full: Tensor,
        valid: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 1, 3) prediction root, GT joints and GT vertices re-rooted at the pelvis where the
        sample has a GT pelvis (mid-hip root and unchanged GT elsewhere)."""
        gt_pelvis = batch.get("pelvis_3d")
        if gt_pelvis is None:
            use = torch.zeros(len(gt_joints), dtype=torch.bool, device=gt_joints.device)
        else:
            use = gt_pelvis[:, 3] > 0
        self.mid_hip_fallbacks += int((~use & (valid > 0).any(dim=1)).sum())
        if not use.any():
            return mid_hip, gt_joints, gt_full
        pick = use[:, None, None]
        pred_pelvis = torch.einsum("v,bvc->bc", self.pelvis_regressor.to(pred_full.dtype), pred_full)[:, None]
        gt_mesh_pelvis = torch.einsum("v,bvc->bc", self.pelvis_regressor.to(gt_full.dtype), gt_full)[:, None]
        root = torch.where(pick, pred_pelvis, mid_hip)
        gt_joints = torch.where(pick, gt_joints - gt_pelvis[:, None, :3].to(gt_joints.dtype), gt_joints)
        gt_full = torch.where(pick, gt_full - gt_mesh_pelvis, gt_full)
        return root, gt_joints, gt_full

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        # the fused kernel updates all parameters in one pass per tensor: ~6x faster than the
        # per-op loop on this CPU for FastMETRO-S's 10 M parameters (same result to 1e-7); CUDA
        # has one too. Not under mixed precision: Lightning clips no fused optimizer's gradients there
        trainer = getattr(self, "_trainer", None)
        mixed = trainer is not None and str(trainer.precision).endswith("-mixed")
        fused = not mixed and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params
        )
        return torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay, fused=fused or None)


def _regressor_matrix(body_model: BodyModel) -> Tensor:
    """(J, V) float32 joint regressor of the body model (its ``joint_regressor`` buffer)."""
    regressor = getattr(body_model, "joint_regressor", None)
    if not isinstance(regressor, Tensor) or regressor.shape != (body_model.num_joints, body_model.num_vertices):
        raise TypeError(
            f"body model '{body_model.name}' must expose joint_regressor as a "
            f"({body_model.num_joints}, {body_model.num_vertices}) tensor"
        )
    return regressor.detach().to(torch.float32).clone()

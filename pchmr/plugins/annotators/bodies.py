"""What the fitting core needs from each body model: which parameters it frees, their priors.

The core applies the global rotation and translation itself (to the root-centred body-frame
output), so an adapter only maps an *articulation* vector (B, D) and a *shape* vector (B, S)
to the body model's parameters, and supplies the pose prior, the elbow/knee bending term and
the shape prior in those coordinates.

* ``anny``: the 19 body bones Anny's pose sampler moves (spine ×5, neck, head, and per side
  upper leg, lower leg, foot, upper arm, lower arm, wrist) are free, 57 values; the other 85
  bones (fingers, toes, twist bones, clavicles, eyes) stay at rest. Shape s (6) maps to the
  phenotype through ``sigmoid(μ + σ s)``, with μ, σ the logit mean and spread of the body
  model's adult shape sampler (:meth:`AnnyBodyModel.sample_shape`, 4,000 draws): s = 0 is the
  mean adult (Anny's phenotype 0.5 is a teenager — age 0.5 — whose smaller size would bias every
  fit's scale), the values stay inside [0, 1], and the shape prior ‖s‖² is a unit Gaussian.
* ``smpl``: ``body_pose`` (69) and ``betas`` (10), SMPLify's GMM from the user's
  ``gmm_08.pkl`` (or the ``limits``-free fallback ``l2``), SMPLify's bending components.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pchmr.core.contracts.bodymodel import BodyModel, BodyOutput
from pchmr.plugins.annotators.priors import (
    JointLimitPrior,
    anny_limits,
    fit_anny_gmm,
    load_smplify_gmm,
)

__all__ = ["ANNY_FIT_BONES", "FitBody", "make_fit_body"]

ANNY_FIT_BONES = (
    "spine05", "spine04", "spine03", "spine02", "spine01", "neck01", "head",
    "upperleg01.L", "lowerleg01.L", "foot.L", "upperleg01.R", "lowerleg01.R", "foot.R",
    "upperarm01.L", "lowerarm01.L", "wrist.L", "upperarm01.R", "lowerarm01.R", "wrist.R",
)  # fmt: skip
#: SMPL ``body_pose`` (69) components SMPLify's bending term acts on (elbows' y, knees' x; 55, 58,
#: 12, 15 of the 72-value pose with the global rotation first) and the sign that makes the
#: natural bending direction negative inside exp().
SMPL_BEND_INDEX = (52, 55, 9, 12)
SMPL_BEND_SIGN = (1.0, -1.0, -1.0, -1.0)
SMPL_NUM_BETAS = 10
PRIOR_CHOICES = ("gmm", "limits", "l2")


@dataclass
class FitBody:
    """The fitted body's free parameters and their priors (all per image, shape (B,)).

    ``fast_joints`` (optional) maps the body model's parameters to (B, J, 3) body-frame joints
    without posing the whole mesh; the optimiser uses it, the final result the full mesh."""

    body_model: BodyModel
    articulation_dim: int
    shape_dim: int
    to_params: Callable[[Tensor, Tensor], dict[str, Tensor]]
    pose_prior: nn.Module | Callable[[Tensor], Tensor]
    bending: Callable[[Tensor], Tensor]
    prior_name: str
    fast_joints: Callable[..., Tensor] | None = None

    def forward(self, articulation: Tensor, shape: Tensor) -> BodyOutput:
        """Body-frame posed body (B, V, 3), (B, J, 3) at zero global rotation."""
        return self.body_model(**self.to_params(articulation, shape))

    def joints(self, articulation: Tensor, shape: Tensor) -> Tensor:
        """(B, J, 3) body-frame joints at zero global rotation (the fast path when there is one)."""
        params = self.to_params(articulation, shape)
        if self.fast_joints is not None:
            return self.fast_joints(**params)
        return self.body_model(**params).joints

    def shape_prior(self, shape: Tensor) -> Tensor:
        return (shape**2).sum(-1)

    def to_device(self, device: torch.device) -> None:
        """The body model, the pose prior and the fast joint path on ``device`` (the adapters'
        other constants follow their inputs)."""
        self.body_model.to(device)
        if isinstance(self.pose_prior, nn.Module):
            self.pose_prior.to(device)
        if isinstance(self.fast_joints, _AnnyJoints):
            self.fast_joints.to_device(device)


def make_fit_body(body_model: BodyModel, pose_prior: str = "gmm", prior_file: str | None = None,
                  cache_dir: str | None = None) -> FitBody:  # fmt: skip
    """The adapter of ``body_model`` (``anny`` or ``smpl``) with the chosen pose prior."""
    if pose_prior not in PRIOR_CHOICES:
        raise ValueError(f"pose_prior must be one of {PRIOR_CHOICES}, got {pose_prior!r}")
    if body_model.name == "anny":
        return _anny(body_model, pose_prior, cache_dir)
    if body_model.name == "smpl":
        return _smpl(body_model, pose_prior, prior_file)
    raise ValueError(
        f"the fitting core knows the body models 'anny' and 'smpl', not {body_model.name!r}; "
        "add an adapter in pchmr.plugins.annotators.bodies"
    )


def _anny(body_model: Any, pose_prior: str, cache_dir: str | None) -> FitBody:
    labels = tuple(body_model.bone_labels)
    index = torch.tensor([labels.index(b) for b in ANNY_FIT_BONES])
    num_bones = len(labels)
    dim = 3 * len(ANNY_FIT_BONES)

    mu, sigma = _anny_shape_statistics(body_model)

    def to_params(articulation: Tensor, shape: Tensor) -> dict[str, Tensor]:
        pose = articulation.new_zeros(articulation.shape[0], num_bones, 3)
        pose = pose.index_copy(1, index.to(pose.device), articulation.view(-1, len(ANNY_FIT_BONES), 3))
        return {"pose": pose, "phenotype": torch.sigmoid(mu.to(shape) + sigma.to(shape) * shape)}

    if pose_prior == "gmm":
        prior: Any = fit_anny_gmm(body_model, ANNY_FIT_BONES, Path(cache_dir) / "priors" if cache_dir else None)
    elif pose_prior == "limits":
        prior = JointLimitPrior(*anny_limits(ANNY_FIT_BONES))
    else:
        prior = _l2
    bending = _anny_bending(body_model)
    return FitBody(body_model, dim, 6, to_params, prior, bending, pose_prior, _AnnyJoints.build(body_model))


#: Vertices kept per joint by the fitting-time joint regressor (see :class:`_AnnyJoints`).
FAST_JOINT_VERTICES = 48
#: The fast joints must match the full regressor within this (metres) at the check poses.
FAST_JOINT_TOLERANCE = 5e-3


class _AnnyJoints:
    """Anny's evaluation joints from a 624-vertex sub-mesh instead of the 13,718-vertex mesh.

    Each joint keeps the :data:`FAST_JOINT_VERTICES` vertices of largest regressor weight
    (renormalised); Anny's skinning is run on a copy of the model whose per-vertex buffers
    are sliced to those vertices (bones, phenotype and pose are unchanged). Measured on random
    poses: 0.2 mm mean, 1.2 mm max difference to the full regressor, ~20× fewer vertices to
    skin. :meth:`build` checks the agreement and returns None (full forward) when Anny's
    internals differ from what this expects."""

    _VERTEX_BUFFERS = ("template_vertices", "vertex_bone_weights", "vertex_bone_indices", "base_mesh_vertex_indices")

    def __init__(self, body_model: Any, used: Tensor, weights: Tensor) -> None:
        import copy

        full = body_model.anny
        self.sub = copy.copy(full)
        self.sub._buffers = dict(full._buffers)
        self.sub._modules = dict(full._modules)
        for name in self._VERTEX_BUFFERS:
            self.sub._buffers[name] = full._buffers[name][used]
        self.sub._buffers["blendshapes"] = full._buffers["blendshapes"][:, used]
        self.weights = weights

    @classmethod
    def build(cls, body_model: Any) -> _AnnyJoints | None:
        regressor = body_model.joint_regressor.detach().cpu()
        top = torch.topk(regressor.abs(), FAST_JOINT_VERTICES, dim=1).indices
        used = torch.unique(top.flatten())
        slot = torch.full((regressor.shape[1],), -1, dtype=torch.int64)
        slot[used] = torch.arange(len(used))
        weights = torch.zeros(regressor.shape[0], len(used))
        for j in range(regressor.shape[0]):
            w = regressor[j, top[j]]
            weights[j, slot[top[j]]] = w / w.sum()
        try:
            fast = cls(body_model, used, weights)
            check = torch.zeros(2, len(body_model.bone_labels), 3)
            check[1, :, 0] = 0.3  # every bone bent: exercises the skinning of the kept vertices
            with torch.no_grad():
                error = (fast(pose=check) - body_model(pose=check).joints).abs().max()
        except (AttributeError, KeyError, RuntimeError, IndexError):
            return None
        return fast if float(error) < FAST_JOINT_TOLERANCE else None

    def to_device(self, device: torch.device) -> None:
        """The sub-mesh's own buffers and the joint weights on ``device`` (its bones are the
        full model's, moved with it)."""
        for name, buffer in self.sub._buffers.items():
            if buffer is not None:
                self.sub._buffers[name] = buffer.to(device)
        self.weights = self.weights.to(device)

    def __call__(self, pose: Tensor, phenotype: Tensor | None = None) -> Tensor:
        from pchmr.plugins.bodymodels.anny import ANNY_TO_BODY, axis_angle_to_matrix

        batch = pose.shape[0]
        dtype = self.sub.template_vertices.dtype
        conv = torch.as_tensor(ANNY_TO_BODY, dtype=dtype, device=pose.device)
        delta = torch.zeros(batch, pose.shape[1], 4, 4, dtype=dtype, device=pose.device)
        delta[..., :3, :3] = axis_angle_to_matrix(pose.to(dtype) @ conv)  # body-frame axes → Anny's
        delta[..., 3, 3] = 1.0
        if phenotype is None:
            phenotype = pose.new_full((batch, 6), 0.5)
        vertices = self.sub(pose_parameters=delta, phenotype_kwargs=phenotype.to(dtype))["vertices"] @ conv.T
        return torch.einsum("jv,bvc->bjc", self.weights.to(vertices), vertices).to(pose.dtype)


SHAPE_STAT_SAMPLES = 4000
SHAPE_STAT_SEED = 99


def _anny_shape_statistics(body_model: Any) -> tuple[Tensor, Tensor]:
    """(6,) mean and standard deviation of logit(phenotype) under the adult shape sampler."""
    draws = body_model.sample_shape(SHAPE_STAT_SAMPLES, np.random.default_rng(SHAPE_STAT_SEED)).astype(np.float64)
    logits = np.log(draws / (1.0 - draws))
    return torch.tensor(logits.mean(0), dtype=torch.float32), torch.tensor(logits.std(0), dtype=torch.float32)


def _anny_bending(body_model: Any) -> Callable[[Tensor], Tensor]:
    """SMPLify's bending term for Anny: Σ exp(−flexion) over both knees (flexion = +x of
    ``lowerleg01``) and both elbows (total flexion = rest flexion + rotation about the rest
    hinge), penalising hyper-extension steeply and bending gently."""
    from pchmr.plugins.bodymodels.anny import ANNY_TO_BODY, ArmRest

    heads = body_model.anny.template_bone_heads.detach().cpu().double().numpy() @ ANNY_TO_BODY.T
    labels = tuple(body_model.bone_labels)
    arm = ArmRest.from_points(*(heads[labels.index(b)] for b in ("upperarm01.L", "lowerarm01.L", "wrist.L")))
    hinge_l = torch.tensor(arm.hinge, dtype=torch.float32)
    hinge_r = hinge_l * torch.tensor([1.0, -1.0, -1.0])
    rest = float(np.radians(arm.rest_flexion))
    slot = {b: i for i, b in enumerate(ANNY_FIT_BONES)}

    def bending(articulation: Tensor) -> Tensor:
        rot = articulation.view(articulation.shape[0], -1, 3)
        knees = rot[:, [slot["lowerleg01.L"], slot["lowerleg01.R"]], 0]
        elbow_l = rot[:, slot["lowerarm01.L"]] @ hinge_l.to(rot) + rest
        elbow_r = rot[:, slot["lowerarm01.R"]] @ hinge_r.to(rot) + rest
        return torch.exp(-knees).sum(-1) + torch.exp(-elbow_l) + torch.exp(-elbow_r)

    return bending


def _smpl(body_model: Any, pose_prior: str, prior_file: str | None) -> FitBody:
    def to_params(articulation: Tensor, shape: Tensor) -> dict[str, Tensor]:
        orient = articulation.new_zeros(articulation.shape[0], 3)
        return {"global_orient": orient, "body_pose": articulation, "betas": shape}

    if pose_prior == "gmm":
        if prior_file is None:
            raise ValueError(
                "the smpl body model's gmm pose prior is SMPLify's gmm_08.pkl: pass pose_prior_file=PATH, "
                "or choose pose_prior=l2"
            )
        prior: Any = load_smplify_gmm(prior_file)
    elif pose_prior == "limits":
        raise ValueError(
            "joint limits are written for Anny; for smpl choose pose_prior=gmm (with pose_prior_file) or l2"
        )
    else:
        prior = _l2
    index = torch.tensor(SMPL_BEND_INDEX)
    sign = torch.tensor(SMPL_BEND_SIGN)

    def bending(articulation: Tensor) -> Tensor:
        return torch.exp(articulation[:, index.to(articulation.device)] * sign.to(articulation)).sum(-1)

    return FitBody(body_model, 69, SMPL_NUM_BETAS, to_params, prior, bending, pose_prior)


def _l2(x: Tensor) -> Tensor:
    return (x**2).sum(-1)


def describe_fit_body(fit_body: FitBody) -> Mapping[str, object]:
    return {"body_model": fit_body.body_model.name, "pose_prior": fit_body.prior_name,
            "articulation_dim": fit_body.articulation_dim, "shape_dim": fit_body.shape_dim}  # fmt: skip

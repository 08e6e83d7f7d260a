"""The fitting core shared by ``smplifyx`` and ``deposer``: a batched, staged, SMPLify-X-style
fit of any body model (through :mod:`.bodies`) to 2D keypoints and, optionally, per-keypoint
depth.

Model. A camera-frame point is ``X_cam = R (X_body − root) + t``: the body model's output in its
own frame (y up), centred at its root (mid-hip), rotated by ``R = exp(ω) · F`` where ``F`` =
diag(1, −1, −1) turns a body facing the camera into the camera frame, and translated by
``t = (t_x, t_y, exp(ℓ))`` (positive depth by construction). Projection with the observation's
crop-unit intrinsics: ``u = f x/z + c_x`` (:mod:`pchmr.core.contracts.annotation`).

Energy per image (all terms (B,), summed over the batch for the optimiser):

* ``data``: Σ_j c_j ρ(‖u_j − k_j‖²), residuals in pixels of a 224-pixel crop (crop units ×
  :data:`PX_SCALE`), ρ the Geman–McClure function σ²e²/(σ² + e²) with σ = ``sigma_px``;
* ``pose``: the adapter's pose prior (GMM max-mixture, joint limits or L2);
* ``bend``: Σ exp(−flexion) over elbows and knees (the adapter's);
* ``shape``: ‖s‖² of the adapter's shape vector;
* ``collision``: body-part spheres placed along the 14 evaluation joints
  (:data:`SPHERES`): Σ relu(r_a + r_b − ‖c_a − c_b‖)² in centimetres² over sphere pairs of
  non-adjacent parts — a cheap interpenetration proxy (SMPLify-X uses BVH-detected triangle
  collisions; spheres miss thin-part contacts but cost 300 distances per image);
* ``depth`` (``depth_weight`` > 0): SILog on log depths after aligning the source's scale
  (and shift), see :func:`depth_energy`.

Stages. (0) camera: ω and t from the torso joints, the body at its initial pose, for
``orientations`` yaw hypotheses (0°, 90°, 180°, 270° about the camera's vertical axis), keeping
the lowest energy per image; t starts from torso similar triangles (depth = focal × 3D torso
length / 2D torso length). (1–3) everything free, pose/shape prior weights decreasing as in
SMPLify-X. Each stage is one ``torch.optim.LBFGS`` run with a strong-Wolfe line search (or
Adam, for the SPIN-SMPLify comparison). The B images share the optimiser (one line search
for the summed energy), which is what makes batching cheap on a CPU; their energies are
independent, so an image's fit does not read any other image's data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from pchmr.core.contracts.annotation import (
    DEPTH_INVARIANCES,
    FitResult,
    ObservationBatch,
)
from pchmr.plugins.annotators.bodies import FitBody
from pchmr.plugins.annotators.priors import GaussianMixturePrior

__all__ = ["FitConfig", "Fitter", "StageWeights", "depth_energy", "geman_mcclure", "silog"]

#: Crop units → pixels of a 224-pixel crop (crop coordinates span 2 units).
PX_SCALE = 112.0
#: Depths below this (metres) are clamped in the projection and the depth term.
MIN_DEPTH = 0.05
TORSO = ("left_shoulder", "right_shoulder", "left_hip", "right_hip")
ORIENTATION_YAWS_DEG = (0.0, 90.0, 180.0, 270.0)
SILOG_FORMS = ("eigen", "printed")
OPTIMIZERS = ("lbfgs", "adam")
#: Fewer valid depths than this in an image → no depth term for it.
MIN_DEPTH_JOINTS = 3
#: Spheres (part, joint a, joint b, t, radius m): centre at a + t (b − a) of the LSP-14 joints.
SPHERES: tuple[tuple[str, str, str, float, float], ...] = (
    ("torso", "left_hip", "right_hip", 0.5, 0.12),
    ("torso", "left_hip", "left_shoulder", 0.5, 0.11),
    ("torso", "right_hip", "right_shoulder", 0.5, 0.11),
    ("torso", "left_shoulder", "right_shoulder", 0.5, 0.09),
    ("head", "head", "head", 0.0, 0.10),
    ("l_upperarm", "left_shoulder", "left_elbow", 0.6, 0.05),
    ("l_forearm", "left_elbow", "left_wrist", 0.5, 0.04),
    ("l_forearm", "left_wrist", "left_wrist", 0.0, 0.045),
    ("r_upperarm", "right_shoulder", "right_elbow", 0.6, 0.05),
    ("r_forearm", "right_elbow", "right_wrist", 0.5, 0.04),
    ("r_forearm", "right_wrist", "right_wrist", 0.0, 0.045),
    ("l_thigh", "left_hip", "left_knee", 0.55, 0.07),
    ("l_shin", "left_knee", "left_ankle", 0.5, 0.05),
    ("l_shin", "left_ankle", "left_ankle", 0.0, 0.045),
    ("r_thigh", "right_hip", "right_knee", 0.55, 0.07),
    ("r_shin", "right_knee", "right_ankle", 0.5, 0.05),
    ("r_shin", "right_ankle", "right_ankle", 0.0, 0.045),
)
#: Part pairs allowed to touch (joined by a joint, or resting against each other).
ADJACENT_PARTS = frozenset(
    frozenset(p) for p in (
        ("torso", "head"), ("torso", "l_upperarm"), ("torso", "r_upperarm"), ("torso", "l_thigh"),
        ("torso", "r_thigh"), ("l_upperarm", "l_forearm"), ("r_upperarm", "r_forearm"),
        ("l_thigh", "l_shin"), ("r_thigh", "r_shin"), ("l_thigh", "r_thigh"),
    )
)  # fmt: skip


@dataclass(frozen=True)
class StageWeights:
    """Weights of one stage (the data term has weight 1) and its iteration budget."""

    pose: float
    shape: float
    bend: float
    collision: float
    iterations: int


#: SMPLify-X's schedule shape (priors relaxed stage by stage), rescaled to pchmr's units.
DEFAULT_STAGES = (
    StageWeights(pose=400.0, shape=100.0, bend=50.0, collision=0.0, iterations=30),
    StageWeights(pose=100.0, shape=30.0, bend=15.0, collision=1.0, iterations=30),
    StageWeights(pose=25.0, shape=10.0, bend=5.0, collision=1.0, iterations=40),
)


@dataclass(frozen=True)
class FitConfig:
    """Options of the fitting core (the annotators' ``key=value`` options; see docs/annotation.md).

    ``depth_weight`` 0 is ``smplifyx``; ``silog_lambda`` is Eigen et al.'s variance weight λ
    (1 = fully scale-invariant, 0 = plain log-L2); ``silog_form`` ``printed`` uses the PCHMR
    paper's Eq. 2 instead (see :func:`silog`); ``depth_align`` overrides the alignment implied
    by the source's invariance (``metric``: none, ``scale``: median log ratio, ``affine``:
    least-squares scale and shift)."""

    optimizer: str = "lbfgs"
    stages: tuple[StageWeights, ...] = DEFAULT_STAGES
    camera_iterations: int = 20
    adam_lr: float = 0.02
    sigma_px: float = 50.0
    depth_weight: float = 0.0
    silog_lambda: float = 0.5
    silog_form: str = "eigen"
    depth_align: str | None = None
    orientations: int = 4
    camera_depth_prior: float = 100.0
    default_torso_m: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.silog_form not in SILOG_FORMS:
            raise ValueError(f"silog_form must be one of {SILOG_FORMS}, got {self.silog_form!r}")
        if self.depth_align is not None and self.depth_align not in DEPTH_INVARIANCES:
            raise ValueError(f"depth_align must be one of {DEPTH_INVARIANCES}, got {self.depth_align!r}")
        if not 0.0 <= self.silog_lambda <= 1.0:
            raise ValueError(f"silog_lambda must lie in [0, 1], got {self.silog_lambda}")
        if not 1 <= self.orientations <= len(ORIENTATION_YAWS_DEG):
            raise ValueError(f"orientations must be 1..{len(ORIENTATION_YAWS_DEG)}, got {self.orientations}")
        if self.depth_weight < 0 or self.sigma_px <= 0:
            raise ValueError(f"depth_weight must be >= 0 and sigma_px > 0, got {self.depth_weight}, {self.sigma_px}")

    def with_adam_iterations(self, total: int) -> FitConfig:
        """Adam with ``total`` iterations split over the stages like the L-BFGS budget."""
        budget = sum(s.iterations for s in self.stages)
        stages = tuple(replace(s, iterations=max(1, round(total * s.iterations / budget))) for s in self.stages)
        return replace(self, optimizer="adam", stages=stages)


# ---------------------------------------------------------------------------- energies
def geman_mcclure(squared: Tensor, sigma: float) -> Tensor:
    """ρ(e²) = σ² e² / (σ² + e²): quadratic for small residuals, bounded by σ² for outliers."""
    return sigma**2 * squared / (sigma**2 + squared)


def silog(d: Tensor, valid: Tensor, lam: float, form: str = "eigen") -> Tensor:
    """Scale-invariant log error of (B, N) log-depth residuals ``d`` over ``valid`` (B, N):

    * ``eigen`` (Eigen et al. 2014): ``n·[mean(d²) − λ mean(d)²]``; λ = 1 ignores any common
      log offset (a global scale), λ = 0 is the plain squared log error;
    * ``printed`` (PCHMR Eq. 2): ``n·[mean(d²) − ½ √mean(d²)]`` — *not* scale-invariant, and its
      minimum is at RMS(d) = 1/4, not at d = 0: it rewards a 28 % depth error over a perfect fit.

    Returns (B,); images with fewer than :data:`MIN_DEPTH_JOINTS` valid values give 0."""
    n = valid.sum(-1)
    safe_n = n.clamp_min(1.0)
    mean_sq = (valid * d**2).sum(-1) / safe_n
    if form == "eigen":
        mean = (valid * d).sum(-1) / safe_n
        value = mean_sq - lam * mean**2
    elif form == "printed":
        value = mean_sq - 0.5 * torch.sqrt(mean_sq + 1e-12)
    else:
        raise ValueError(f"silog form must be one of {SILOG_FORMS}, got {form!r}")
    return torch.where(n >= MIN_DEPTH_JOINTS, n * value, torch.zeros_like(value))


def align_depth(model_z: Tensor, observed: Tensor, valid: Tensor, mode: str) -> Tensor:
    """The observed depths (B, N) brought onto the model's (B, N) depths:

    * ``metric``: unchanged;
    * ``scale``: multiplied by exp(median of log(model/observed)) over valid joints (robust to
      a few wrong depths);
    * ``affine``: s·observed + t with (s, t) the weighted least-squares fit to the model's
      depths; when s ≤ 0 (a flat or reversed fit) the scale-only alignment is used instead.
    The alignment is differentiable in the model's depths (it is part of the energy)."""
    obs = observed.clamp_min(MIN_DEPTH)
    if mode == "metric":
        return obs
    log_ratio = torch.log(model_z.clamp_min(MIN_DEPTH)) - torch.log(obs)
    masked = torch.where(valid > 0, log_ratio, torch.full_like(log_ratio, float("nan")))
    median = torch.nan_to_num(torch.nanmedian(masked, dim=-1).values, nan=0.0)
    scaled = obs * torch.exp(median)[:, None]
    if mode == "scale":
        return scaled
    w = valid
    wsum = w.sum(-1, keepdim=True).clamp_min(1.0)
    mo, mz = (w * obs).sum(-1, keepdim=True) / wsum, (w * model_z).sum(-1, keepdim=True) / wsum
    var = (w * (obs - mo) ** 2).sum(-1, keepdim=True)
    cov = (w * (obs - mo) * (model_z - mz)).sum(-1, keepdim=True)
    s = cov / var.clamp_min(1e-12)
    affine = (s * (obs - mo) + mz).clamp_min(MIN_DEPTH)
    ok = (s > 1e-6) & (var > 1e-10)
    return torch.where(ok, affine, scaled)


def depth_energy(model_z: Tensor, batch: ObservationBatch, focal: Tensor, cfg: FitConfig) -> Tensor:
    """(B,) SILog of the model's joint depths (B, J) against the batch's aligned depths.

    Log residuals are multiplied by the focal length in 224-crop pixels, so that a depth error
    counts like the lateral error of the same size (Δz/z · f pixels): ``depth_weight`` is then
    the relative trust in depth versus 2D, about (σ_2D / σ_depth)² in those units."""
    mode = cfg.depth_align or batch.depth_invariance
    valid = batch.depth_valid
    target = align_depth(model_z, batch.depth, valid, mode)
    d = torch.log(model_z.clamp_min(MIN_DEPTH)) - torch.log(target)
    scale = (focal * PX_SCALE)[:, None]
    return silog(d * scale, valid, cfg.silog_lambda, cfg.silog_form)


def _sphere_setup(joint_names: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    index = {n: i for i, n in enumerate(joint_names)}
    missing = sorted({n for s in SPHERES for n in s[1:3]} - set(index))
    if missing:
        raise ValueError(
            f"the collision spheres need the LSP-14 joints {missing}; the body model has {list(joint_names)}"
        )
    a = torch.tensor([index[s[1]] for s in SPHERES])
    b = torch.tensor([index[s[2]] for s in SPHERES])
    t = torch.tensor([s[3] for s in SPHERES])
    radius = torch.tensor([s[4] for s in SPHERES])
    parts = [s[0] for s in SPHERES]
    pairs = [(i, j) for i in range(len(SPHERES)) for j in range(i + 1, len(SPHERES))
             if parts[i] != parts[j] and frozenset((parts[i], parts[j])) not in ADJACENT_PARTS]  # fmt: skip
    return a, b, t, radius, torch.tensor(pairs)


# ------------------------------------------------------------------------------ fitter
@dataclass
class _State:
    orient: Tensor  # (B, 3) axis-angle in the camera frame, applied after F
    transl_xy: Tensor  # (B, 2) metres
    log_depth: Tensor  # (B,) log metres
    articulation: Tensor  # (B, D)
    shape: Tensor  # (B, S)
    extra: dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        return [self.orient, self.transl_xy, self.log_depth, self.articulation, self.shape]


class Fitter:
    """Batched fit of one :class:`~.bodies.FitBody` (see the module docstring)."""

    def __init__(self, fit_body: FitBody, config: FitConfig) -> None:
        self.body = fit_body
        self.config = config
        names = tuple(fit_body.body_model.joint_names)
        self.joint_names = names
        self.torso = [names.index(n) for n in TORSO]
        self.spheres = _sphere_setup(names)
        self.flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
        #: where the fit computes: where it was built (the CPU) until :meth:`to_device`; batches go there too
        self.device = self.flip.device
        with torch.no_grad():
            rest = self._body_joints(torch.zeros(1, fit_body.articulation_dim), torch.zeros(1, fit_body.shape_dim))[0]
        self.rest_joints = rest
        shoulders_hips = rest[[names.index(n) for n in TORSO]]
        self.torso_m = config.default_torso_m or float(
            0.5 * ((shoulders_hips[0] - shoulders_hips[2]).norm() + (shoulders_hips[1] - shoulders_hips[3]).norm())
        )

    def to_device(self, device: torch.device) -> None:
        """Fit on ``device``: the body model, its priors and the fit's constants move there."""
        self.body.to_device(device)
        a, b, t, radius, pairs = self.spheres
        self.spheres = (a.to(device), b.to(device), t.to(device), radius.to(device), pairs.to(device))
        self.rest_joints = self.rest_joints.to(device)
        self.device = device

    # -- geometry ------------------------------------------------------------------------
    def _body_frame(self, articulation: Tensor, shape: Tensor) -> tuple[Tensor, Tensor]:
        out = self.body.forward(articulation, shape)
        root = self.body.body_model.root(out.joints)
        return out.vertices - root, out.joints - root

    def _body_joints(self, articulation: Tensor, shape: Tensor) -> Tensor:
        """(B, J, 3) root-centred body-frame joints (the adapter's fast path)."""
        joints = self.body.joints(articulation, shape)
        return joints - self.body.body_model.root(joints)

    def _rotation(self, orient: Tensor) -> Tensor:
        from pchmr.plugins.bodymodels.anny import axis_angle_to_matrix

        return axis_angle_to_matrix(orient) @ self.flip.to(orient)

    def _to_camera(self, points: Tensor, state: _State) -> Tensor:
        translation = torch.cat([state.transl_xy, state.log_depth.exp()[:, None]], dim=-1)
        return points @ self._rotation(state.orient).transpose(1, 2) + translation[:, None]

    @staticmethod
    def _project(points: Tensor, intrinsics: Tensor) -> Tensor:
        z = points[..., 2].clamp_min(MIN_DEPTH)
        f, cx, cy = intrinsics[:, 0:1], intrinsics[:, 1:2], intrinsics[:, 2:3]
        return torch.stack([f * points[..., 0] / z + cx, f * points[..., 1] / z + cy], dim=-1)

    # -- energy --------------------------------------------------------------------------
    def _data(self, cam_joints: Tensor, batch: ObservationBatch, joints: Sequence[int] | None = None) -> Tensor:
        proj = self._project(cam_joints, batch.intrinsics)
        residual = (proj - batch.keypoints[..., :2]) * PX_SCALE
        conf = batch.keypoints[..., 2]
        rho = geman_mcclure((residual**2).sum(-1), self.config.sigma_px) * conf
        return rho[:, list(joints)].sum(-1) if joints is not None else rho.sum(-1)

    def _collision(self, cam_joints: Tensor) -> Tensor:
        a, b, t, radius, pairs = self.spheres
        centres = cam_joints[:, a] + t[None, :, None].to(cam_joints) * (cam_joints[:, b] - cam_joints[:, a])
        gap = (centres[:, pairs[:, 0]] - centres[:, pairs[:, 1]]).norm(dim=-1)
        depth = torch.relu(radius[pairs[:, 0]] + radius[pairs[:, 1]] - gap) * 100.0
        return (depth**2).sum(-1)

    def energies(self, state: _State, batch: ObservationBatch, stage: StageWeights) -> dict[str, Tensor]:
        """Per-image (B,) weighted terms and ``total`` for the full stages."""
        cam_joints = self._to_camera(self._body_joints(state.articulation, state.shape), state)
        terms = {
            "data": self._data(cam_joints, batch),
            "pose": stage.pose * self.body.pose_prior(state.articulation),
            "bend": stage.bend * self.body.bending(state.articulation),
            "shape": stage.shape * self.body.shape_prior(state.shape),
            "collision": stage.collision * self._collision(cam_joints),
        }
        if self.config.depth_weight > 0:
            terms["depth"] = self.config.depth_weight * depth_energy(
                cam_joints[..., 2], batch, batch.intrinsics[:, 0], self.config
            )
        terms["total"] = sum(terms.values())  # type: ignore[assignment]
        return terms

    def _camera_energy(self, state: _State, batch: ObservationBatch, rest: Tensor, depth0: Tensor) -> Tensor:
        cam_joints = self._to_camera(rest, state)
        energy = self._data(cam_joints, batch, self.torso)
        energy = energy + self.config.camera_depth_prior * (state.log_depth - depth0) ** 2
        if self.config.depth_weight > 0:
            torso_batch = replace(batch, depth_valid=batch.depth_valid * _mask(batch.depth_valid, self.torso))
            energy = energy + self.config.depth_weight * depth_energy(
                cam_joints[..., 2], torso_batch, batch.intrinsics[:, 0], self.config
            )
        return energy

    # -- optimisation --------------------------------------------------------------------
    def _minimise(self, params: list[Tensor], energy: Callable[[], Tensor], iterations: int) -> None:
        for p in params:
            p.requires_grad_(True)
        if self.config.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip

            def closure() -> Tensor:
                opt.zero_grad()
                loss = energy().sum()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            adam = torch.optim.Adam(params, lr=self.config.adam_lr)
            for _ in range(iterations):
                adam.zero_grad()
                energy().sum().backward()
                adam.step()
        for p in params:
            p.requires_grad_(False)

    def initial_camera(self, batch: ObservationBatch) -> tuple[Tensor, Tensor]:
        """Torso similar triangles: (B,) depth = f · torso_m / 2D torso length and (B, 2) x, y
        of the root under the 2D mid-hip (falls back to the keypoints' extent when a torso
        side is missing)."""
        kp, conf = batch.keypoints[..., :2], batch.keypoints[..., 2]
        ls, rs, lh, rh = self.torso
        lengths, weights = [], []
        for s, h in ((ls, lh), (rs, rh)):
            lengths.append((kp[:, s] - kp[:, h]).norm(dim=-1))
            weights.append(((conf[:, s] > 0) & (conf[:, h] > 0)).float())
        w = torch.stack(weights, -1)
        torso_2d = (torch.stack(lengths, -1) * w).sum(-1) / w.sum(-1).clamp_min(1.0)
        visible = conf > 0
        big = torch.full_like(kp[..., 0], 1e9)
        extent = torch.maximum(
            torch.where(visible, kp[..., 1], -big).max(-1).values
            - torch.where(visible, kp[..., 1], big).min(-1).values,
            torch.where(visible, kp[..., 0], -big).max(-1).values
            - torch.where(visible, kp[..., 0], big).min(-1).values,
        )
        torso_2d = torch.where(w.sum(-1) > 0, torso_2d, extent / 3.0).clamp_min(1e-3)
        f = batch.intrinsics[:, 0]
        depth = f * self.torso_m / torso_2d
        hips_w = (conf[:, [lh, rh]] > 0).float()
        root_2d = (kp[:, [lh, rh]] * hips_w[..., None]).sum(1) / hips_w.sum(-1, keepdim=True).clamp_min(1.0)
        root_2d = torch.where(
            hips_w.sum(-1, keepdim=True) > 0,
            root_2d,
            (kp * visible[..., None]).sum(1) / visible.sum(-1, keepdim=True).clamp_min(1),
        )
        xy = (root_2d - batch.intrinsics[:, 1:]) * depth[:, None] / f[:, None]
        return depth, xy

    def initial_poses(self) -> Tensor:
        """(P, D) starting articulations: the GMM's component means (each a typical pose of
        the prior), or the rest pose for the other priors."""
        prior = self.body.pose_prior
        if isinstance(prior, GaussianMixturePrior):
            return prior.means.clone()
        return torch.zeros(1, self.body.articulation_dim, device=self.device)

    def fit(self, batch: ObservationBatch) -> FitResult:
        """Fit every image of ``batch``; returns camera-frame root-relative meshes and losses."""
        with torch.no_grad():
            poses = self.initial_poses()
            pose_joints = self._body_joints(poses, torch.zeros(len(poses), self.body.shape_dim, device=self.device))
            depth0, xy0 = self.initial_camera(batch)
        state = self._fit_camera(batch, pose_joints, poses, depth0, xy0)
        for stage in self.config.stages:
            self._minimise(
                state.tensors(), lambda stage=stage: self.energies(state, batch, stage)["total"], stage.iterations
            )
        return self._result(state, batch, self.config.stages[-1])

    def _fit_camera(
        self, batch: ObservationBatch, pose_joints: Tensor, poses: Tensor, depth0: Tensor, xy0: Tensor
    ) -> _State:
        """Stage 0 over hypotheses (orientation × starting pose): the rigid camera from the
        torso joints, then the hypothesis with the lowest energy over all joints (+ the pose
        prior's value of its starting pose) per image."""
        n, h, p = len(batch), self.config.orientations, len(poses)
        device = self.device
        yaws = torch.tensor([math.radians(y) for y in ORIENTATION_YAWS_DEG[:h]], device=device)
        # hypothesis index = (orientation, pose, image), image fastest
        orient = torch.zeros(h * p * n, 3, device=device)
        orient[:, 1] = yaws.repeat_interleave(p * n)
        pose_of = torch.arange(p, device=device).repeat_interleave(n).repeat(h)
        rep = batch.select(list(range(n)) * (h * p))
        log_depth0 = depth0.log().repeat(h * p)
        state = _State(orient, xy0.repeat(h * p, 1), log_depth0.clone(), torch.zeros(0), torch.zeros(0))
        joints = pose_joints[pose_of]
        self._minimise([state.orient, state.transl_xy, state.log_depth],
                       lambda: self._camera_energy(state, rep, joints, log_depth0), self.config.camera_iterations)  # fmt: skip
        with torch.no_grad():
            cam_joints = self._to_camera(joints, state)
            energy = self._data(cam_joints, rep) + self.config.camera_depth_prior * (state.log_depth - log_depth0) ** 2
            energy = energy + self.config.stages[0].pose * self.body.pose_prior(poses)[pose_of]
            if self.config.depth_weight > 0:
                energy = energy + self.config.depth_weight * depth_energy(
                    cam_joints[..., 2], rep, rep.intrinsics[:, 0], self.config
                )
            best = energy.view(h * p, n).argmin(0) * n + torch.arange(n, device=device)
        return _State(state.orient[best].clone(), state.transl_xy[best].clone(), state.log_depth[best].clone(),
                      poses[pose_of[best]].clone(), torch.zeros(n, self.body.shape_dim, device=device))  # fmt: skip

    @torch.no_grad()
    def _result(self, state: _State, batch: ObservationBatch, stage: StageWeights) -> FitResult:
        vertices, _joints = self._body_frame(state.articulation, state.shape)
        rotation = self._rotation(state.orient)
        cam_vertices = vertices @ rotation.transpose(1, 2)
        cam_joints = self.body.body_model.joints_from_vertices(cam_vertices)
        root = self.body.body_model.root(cam_joints)
        translation = torch.cat([state.transl_xy, state.log_depth.exp()[:, None]], dim=-1)
        losses = {k: v.detach() for k, v in self.energies(state, batch, stage).items()}
        proj = self._project(cam_joints - root + translation[:, None], batch.intrinsics)
        err = ((proj - batch.keypoints[..., :2]) * PX_SCALE).norm(dim=-1)
        conf = (batch.keypoints[..., 2] > 0).float()
        losses["reprojection_px"] = (err * conf).sum(-1) / conf.sum(-1).clamp_min(1.0)
        params = self.body.to_params(state.articulation, state.shape)
        params = {k: v.detach() for k, v in params.items()}
        params["camera_rotation"] = rotation
        return FitResult(vertices=cam_vertices - root, joints=cam_joints - root, translation=translation,
                         params=params, losses=losses)  # fmt: skip


def _mask(valid: Tensor, joints: Sequence[int]) -> Tensor:
    out = torch.zeros_like(valid)
    out[:, list(joints)] = 1.0
    return out


def describe_config(cfg: FitConfig) -> Mapping[str, object]:
    return {"optimizer": cfg.optimizer, "stages": [vars(s) for s in cfg.stages], "sigma_px": cfg.sigma_px,
            "depth_weight": cfg.depth_weight, "silog_lambda": cfg.silog_lambda, "silog_form": cfg.silog_form,
            "depth_align": cfg.depth_align, "orientations": cfg.orientations}  # fmt: skip

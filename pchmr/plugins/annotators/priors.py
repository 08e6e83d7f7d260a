"""Pose priors of the fitting core: a Gaussian mixture (max-mixture energy, as SMPLify), and
anatomical joint limits for Anny.

Anny has no published pose prior. Two are offered (``pose_prior`` option of the annotators):

* ``gmm`` (default): an 8-component full-covariance mixture fitted (scikit-learn EM, fixed
  seed) to 6,000 poses of Anny's own pose sampler (1,000 per action family of
  :meth:`AnnyBodyModel.sample_pose`), over the 19 body bones that sampler moves. It is cached
  next to the other prepared data. **Caveat**: the synthetic dataset draws its poses from the
  same sampler, so on synthetic data this prior is in-distribution (optimistic); on real images
  it is only as good as the sampler's coverage.
* ``limits``: hand-written anatomical ranges per bone and axis (:data:`ANNY_LIMITS_DEG`, from
  textbook ranges of motion, independent of the sampler): a quadratic penalty outside the
  range plus a weak pull towards the rest pose. Use it to check that a result does not hinge
  on the in-distribution mixture.

For SMPL, :func:`load_smplify_gmm` reads SMPLify's ``gmm_08.pkl`` (keys ``means`` (K, 69),
``covars`` (K, 69, 69), ``weights`` (K,)) from the user's files, allowing NumPy arrays and
plain containers only (:func:`pchmr.core.kit.safe_pickle.safe_load`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pchmr.core.kit.safe_pickle import UnsafeFileError, safe_load

__all__ = ["ANNY_LIMITS_DEG", "GaussianMixturePrior", "JointLimitPrior", "fit_anny_gmm", "load_smplify_gmm"]

GMM_COMPONENTS = 8
GMM_SAMPLES_PER_ACTION = 1000
GMM_SEED = 1234
#: Added to every covariance diagonal (rad²): the sampler holds some axes nearly fixed, and a
#: fit must be allowed to move them a little (≈ 3° standard deviation).
GMM_REG_COVAR = 3e-3
GMM_VERSION = 1


class GaussianMixturePrior(nn.Module):
    """E(x) = min_k [½ (x − μ_k)ᵀ Σ_k⁻¹ (x − μ_k) − log w_k + ½ log det Σ_k] − c, with c the
    smallest constant term, so that E ≥ 0 and E(μ_best) = 0. Input (B, D) radians, output (B,)."""

    def __init__(self, means: np.ndarray, covariances: np.ndarray, weights: np.ndarray) -> None:
        super().__init__()
        means, covs, weights = (np.asarray(a, dtype=np.float64) for a in (means, covariances, weights))
        k, d = means.shape
        if covs.shape != (k, d, d) or weights.shape != (k,):
            raise ValueError(
                f"a mixture of {k} components in {d} dimensions needs covariances ({k}, {d}, {d}) and weights "
                f"({k},), got {covs.shape} and {weights.shape}"
            )
        precisions = np.linalg.inv(covs)
        constants = -np.log(weights / weights.sum()) + 0.5 * np.linalg.slogdet(covs)[1]
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32))
        self.register_buffer("precisions", torch.as_tensor(precisions, dtype=torch.float32))
        self.register_buffer("constants", torch.as_tensor(constants - constants.min(), dtype=torch.float32))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        diff = x[:, None, :] - self.means[None]  # (B, K, D)
        mahalanobis = torch.einsum("bki,kij,bkj->bk", diff, self.precisions, diff)
        return (0.5 * mahalanobis + self.constants[None]).min(dim=1).values


class JointLimitPrior(nn.Module):
    """Σ relu(lo − x)² + relu(x − hi)² over (B, D) radians, plus ``rest_weight``·Σ x²; (B,)."""

    def __init__(self, low: np.ndarray, high: np.ndarray, rest_weight: float = 0.05) -> None:
        super().__init__()
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))
        self.rest_weight = rest_weight

    def forward(self, x: Tensor) -> Tensor:
        outside = torch.relu(self.low - x) + torch.relu(x - self.high)
        return (outside**2).sum(-1) * 50.0 + self.rest_weight * (x**2).sum(-1)


#: (x, y, z) ranges in degrees per LEFT-side or central bone, body axes at rest (x left, y up,
#: z front; the sign conventions of :mod:`pchmr.plugins.bodymodels.anny`): hip flexion is −x,
#: knee flexion +x, shoulder abduction +z. Right-side bones mirror them (y and z negated).
ANNY_LIMITS_DEG: dict[str, tuple[tuple[float, float], ...]] = {
    "upperleg01": ((-125, 30), (-40, 40), (-30, 45)),
    "lowerleg01": ((-5, 150), (-10, 10), (-10, 10)),
    "foot": ((-30, 50), (-20, 20), (-20, 20)),
    "upperarm01": ((-90, 60), (-100, 100), (-60, 150)),
    "lowerarm01": ((-150, 150), (-150, 150), (-150, 150)),  # a hinge off the body axes: loose box
    "wrist": ((-70, 70), (-30, 30), (-40, 40)),
    "spine": ((-8, 20), (-10, 10), (-8, 8)),  # per spine bone (five share the motion)
    "neck01": ((-30, 35), (-40, 40), (-20, 20)),
    "head": ((-30, 35), (-40, 40), (-20, 20)),
}


def anny_limits(bones: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(3·len(bones),) low and high radians for Anny bone labels (``.L``/``.R`` mirrored)."""
    low, high = [], []
    for label in bones:
        stem, _, side = label.partition(".")
        key = "spine" if stem.startswith("spine") else stem
        if key not in ANNY_LIMITS_DEG:
            raise KeyError(f"no joint limits for Anny bone {label!r}; known: {sorted(ANNY_LIMITS_DEG)}")
        for axis, (lo, hi) in enumerate(ANNY_LIMITS_DEG[key]):
            if side == "R" and axis > 0:
                lo, hi = -hi, -lo
            low.append(np.radians(lo))
            high.append(np.radians(hi))
    return np.array(low), np.array(high)


def fit_anny_gmm(body_model: Any, bones: Sequence[str], cache_dir: str | Path | None) -> GaussianMixturePrior:
    """The ``gmm`` prior of Anny's ``bones``: fitted once to the pose sampler and cached as
    ``anny-pose-gmm-<hash>.npz`` in ``cache_dir`` (refitted when the cache is absent)."""
    identity = {"version": GMM_VERSION, "bones": list(bones), "k": GMM_COMPONENTS, "seed": GMM_SEED,
                "n": GMM_SAMPLES_PER_ACTION, "reg": GMM_REG_COVAR, "actions": list(body_model.actions)}  # fmt: skip
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / f"anny-pose-gmm-{digest}.npz" if cache_dir else None
    if path is not None and path.is_file():
        data = np.load(path)
        return GaussianMixturePrior(data["means"], data["covariances"], data["weights"])
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(GMM_SEED)
    index = [body_model.bone_labels.index(b) for b in bones]
    poses = np.concatenate(
        [body_model.sample_pose(GMM_SAMPLES_PER_ACTION, rng, a)[:, index].reshape(GMM_SAMPLES_PER_ACTION, -1)
         for a in body_model.actions]
    )  # fmt: skip
    gmm = GaussianMixture(GMM_COMPONENTS, covariance_type="full", reg_covar=GMM_REG_COVAR, random_state=GMM_SEED)
    gmm.fit(poses.astype(np.float64))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, means=gmm.means_, covariances=gmm.covariances_, weights=gmm.weights_)
        tmp.replace(path)
    return GaussianMixturePrior(gmm.means_, gmm.covariances_, gmm.weights_)


def load_smplify_gmm(path: str | Path) -> GaussianMixturePrior:
    """SMPLify's body-pose mixture (``gmm_08.pkl``: ``means`` (K, 69), ``covars`` (K, 69, 69),
    ``weights`` (K,)) from the user's file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SMPLify pose prior {path} does not exist; download gmm_08.pkl from the SMPLify website "
            "(https://smplify.is.tue.mpg.de, registration required) and pass its path as pose_prior_file="
        )
    try:
        data: Mapping[str, Any] = safe_load(path, what="SMPLify pose prior")  # numpy arrays and containers only
    except UnsafeFileError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable pickle: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}; SMPLify's gmm pickle is a dict of arrays")
    missing = [k for k in ("means", "covars", "weights") if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing}; SMPLify's gmm pickle holds means, covars and weights")
    means = np.asarray(data["means"])
    if means.ndim != 2 or means.shape[1] != 69:
        raise ValueError(f"{path}: 'means' must be (K, 69) SMPL body-pose vectors, got {means.shape}")
    return GaussianMixturePrior(means, np.asarray(data["covars"]), np.asarray(data["weights"]))

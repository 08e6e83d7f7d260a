"""The ``smplifyx`` and ``deposer`` annotators (plugin kind ``annotator``).

* ``smplifyx``: the fitting core (:mod:`.fitting`) with the 2D term only — SMPLify-X's
  recipe (Pavlakos et al. 2019) on pchmr's body models, without hands and face.
* ``deposer``: the same core plus the depth term (the PCHMR paper's DePoser): SILog on
  per-keypoint depth after aligning the source's scale (and shift). Default ``depth_weight``
  0.3, ``silog_lambda`` 0.5 (Eigen et al.'s value).

Options (``--option key=value``, declared by :class:`FittingOptions` and :class:`DePoserOptions`;
``pchmr plugins --options deposer`` lists them): every :class:`~.fitting.FitConfig` scalar, plus
``pose_prior`` (gmm | limits | l2), ``pose_prior_file`` (SMPL: SMPLify's gmm_08.pkl),
``iterations`` (scales every stage's L-BFGS budget by iterations/100), ``adam_iterations``
(switch to Adam with that total, SPIN-SMPLify style), ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from pchmr.core.contracts.annotation import DEPTH_INVARIANCES, FitResult, ObservationBatch
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, option_error, read_options
from pchmr.plugins.annotators.bodies import PRIOR_CHOICES, describe_fit_body, make_fit_body
from pchmr.plugins.annotators.fitting import (
    DEFAULT_STAGES,
    OPTIMIZERS,
    ORIENTATION_YAWS_DEG,
    SILOG_FORMS,
    FitConfig,
    Fitter,
    describe_config,
)

__all__ = ["DePoserOptions", "FittingAnnotator", "FittingOptions", "make_deposer", "make_smplifyx", "pchmr_annotators"]

#: The FitConfig fields that are options (the stages are set by ``iterations`` / ``adam_iterations``).
_CONFIG_OPTIONS = tuple(f.name for f in dataclasses.fields(FitConfig) if f.name != "stages")

DEPOSER_DEPTH_WEIGHT = 0.3
#: The fitting core's defaults, the annotators' option defaults.
_FIT = FitConfig()


@dataclass(frozen=True)
class FittingOptions:
    """``--option`` values of ``smplifyx`` (2D keypoints only: ``depth_weight`` stays 0); the
    :class:`~.fitting.FitConfig` scalars plus the pose prior, the budget and the cache."""

    optimizer: str = option(_FIT.optimizer, choices=OPTIMIZERS, key="optimizer", help="L-BFGS stages or Adam")
    camera_iterations: int = option(
        _FIT.camera_iterations, low=0, key="camera_iterations", help="iterations of the camera-only first stage"
    )
    adam_lr: float = option(_FIT.adam_lr, low=0.0, low_open=True, key="adam_lr", help="Adam's learning rate")
    sigma_px: float = option(
        _FIT.sigma_px, low=0.0, low_open=True, key="sigma_px", help="Geman-McClure scale of the 2D residuals, pixels"
    )
    depth_weight: float = option(
        _FIT.depth_weight, low=0.0, key="depth_weight", help="weight of the SILog depth term (0: 2D only)"
    )
    silog_lambda: float = option(
        _FIT.silog_lambda, low=0.0, high=1.0, key="silog_lambda", help="SILog's λ (1: scale-invariant, 0: log-L2)"
    )
    silog_form: str = option(
        _FIT.silog_form, choices=SILOG_FORMS, key="silog_form", help="eigen (Eigen et al.) or the paper's printed Eq. 2"
    )
    depth_align: str | None = option(
        _FIT.depth_align,
        choices=DEPTH_INVARIANCES,
        key="depth_align",
        default_text="the source's invariance",
        help="how observed depths are aligned to the model's",
    )
    orientations: int = option(
        _FIT.orientations,
        low=1,
        high=len(ORIENTATION_YAWS_DEG),
        key="orientations",
        help="initial body yaws tried (0°, 90°, 180°, 270°), the best kept",
    )
    camera_depth_prior: float = option(
        _FIT.camera_depth_prior, low=0.0, key="camera_depth_prior", help="weight keeping the depth near its start"
    )
    default_torso_m: float | None = option(
        _FIT.default_torso_m,
        low=0.0,
        low_open=True,
        key="default_torso_m",
        default_text="the body model's",
        help="torso length (metres) of the initial depth guess",
    )
    pose_prior: str = option("gmm", choices=PRIOR_CHOICES, key="pose_prior", help="the pose prior")
    pose_prior_file: str | None = option(
        None, key="pose_prior_file", help="SMPL: SMPLify's gmm_08.pkl (the gmm prior's mixture)"
    )
    iterations: int | None = option(
        None, low=1, key="iterations", default_text="100", help="scales every stage's L-BFGS budget by iterations/100"
    )
    adam_iterations: int | None = option(
        None, low=1, key="adam_iterations", help="switch to Adam with this many iterations in all (SPIN-SMPLify style)"
    )
    cache_dir: str | None = option(
        None, key="cache_dir", default_text="pchmr's cache", help="where fitted priors are cached"
    )


@dataclass(frozen=True)
class DePoserOptions(FittingOptions):
    """``--option`` values of ``deposer``: :class:`FittingOptions` with the depth term on."""

    depth_weight: float = option(
        DEPOSER_DEPTH_WEIGHT, low=0.0, key="depth_weight", help="weight of the SILog depth term (0: 2D only)"
    )


class FittingAnnotator:
    """An :class:`~pchmr.core.contracts.annotation.Annotator` running the fitting core."""

    def __init__(self, name: str, body_model: BodyModel, config: FitConfig, pose_prior: str = "gmm",
                 pose_prior_file: str | None = None, cache_dir: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.config = config
        self.fitter = Fitter(make_fit_body(body_model, pose_prior, pose_prior_file, cache_dir), config)

    def fit(self, batch: ObservationBatch) -> FitResult:
        return self.fitter.fit(batch)

    def to_device(self, device: torch.device) -> None:
        """Fit on ``device`` (the :class:`~pchmr.core.contracts.annotation.DeviceAnnotator` capability)."""
        self.fitter.to_device(device)

    def describe(self) -> dict[str, object]:
        return {"annotator": self.name, **describe_fit_body(self.fitter.body), **describe_config(self.config)}


def _build(name: str, body_model: BodyModel, options: FittingOptions) -> FittingAnnotator:
    if name == "smplifyx" and options.depth_weight != 0.0:
        rule = "0 (smplifyx fits 2D keypoints only: use the deposer annotator for a depth term)"
        raise option_error(name, "annotator", "depth_weight", rule, options.depth_weight)
    config = FitConfig(**{key: getattr(options, key) for key in _CONFIG_OPTIONS})
    if options.iterations is not None:
        factor = float(options.iterations) / 100.0
        config = replace(
            config, stages=tuple(replace(s, iterations=max(1, round(s.iterations * factor))) for s in DEFAULT_STAGES)
        )
    if options.adam_iterations is not None:
        config = config.with_adam_iterations(options.adam_iterations)
    cache_dir = options.cache_dir
    if cache_dir is None:
        from pchmr.core.kit.cache import default_cache_dir

        cache_dir = str(default_cache_dir())
    return FittingAnnotator(name, body_model, config, options.pose_prior, options.pose_prior_file, cache_dir)


def make_smplifyx(body_model: BodyModel, options: Mapping[str, object] | None = None) -> FittingAnnotator:
    """SMPLify-X-style fit to 2D keypoints only (options: :class:`FittingOptions`)."""
    return _build("smplifyx", body_model, read_options(FittingOptions, options, plugin="smplifyx", kind="annotator"))


def make_deposer(body_model: BodyModel, options: Mapping[str, object] | None = None) -> FittingAnnotator:
    """DePoser: 2D keypoints plus SILog on per-keypoint depth (options: :class:`DePoserOptions`)."""
    return _build("deposer", body_model, read_options(DePoserOptions, options, plugin="deposer", kind="annotator"))


make_smplifyx.options = FittingOptions  # type: ignore[attr-defined]  # DeclaresOptions
make_deposer.options = DePoserOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_annotators() -> Mapping[str, Callable[..., FittingAnnotator]]:
    return {"smplifyx": make_smplifyx, "deposer": make_deposer}

"""The ``smplifyx`` and ``deposer`` annotators (plugin kind ``annotator``).

* ``smplifyx``: the fitting core (:mod:`.fitting`) with the 2D term only — SMPLify-X's
  recipe (Pavlakos et al. 2019) on pchmr's body models, without hands and face.
* ``deposer``: the same core plus the depth term (the PCHMR paper's DePoser): SILog on
  per-keypoint depth after aligning the source's scale (and shift). Default ``depth_weight``
  0.3, ``silog_lambda`` 0.5 (Eigen et al.'s value).

Options (``--option key=value``; every :class:`~.fitting.FitConfig` scalar, plus):
``pose_prior`` (gmm | limits | l2), ``pose_prior_file`` (SMPL: SMPLify's gmm_08.pkl),
``iterations`` (scales every stage's L-BFGS budget by iterations/100), ``adam_iterations``
(switch to Adam with that total, SPIN-SMPLify style), ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from pchmr.core.contracts.annotation import FitResult, ObservationBatch
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.plugins.annotators.bodies import describe_fit_body, make_fit_body
from pchmr.plugins.annotators.fitting import (
    DEFAULT_STAGES,
    FitConfig,
    Fitter,
    describe_config,
)

__all__ = ["FittingAnnotator", "make_deposer", "make_smplifyx", "pchmr_annotators"]

DEPOSER_DEPTH_WEIGHT = 0.3
_EXTRA_OPTIONS = ("pose_prior", "pose_prior_file", "iterations", "adam_iterations", "cache_dir")
_CONFIG_OPTIONS = tuple(f.name for f in dataclasses.fields(FitConfig) if f.name != "stages")


class FittingAnnotator:
    """An :class:`~pchmr.core.contracts.annotation.Annotator` running the fitting core."""

    def __init__(self, name: str, body_model: BodyModel, config: FitConfig, pose_prior: str = "gmm",
                 pose_prior_file: str | None = None, cache_dir: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.config = config
        self.fitter = Fitter(make_fit_body(body_model, pose_prior, pose_prior_file, cache_dir), config)

    def fit(self, batch: ObservationBatch) -> FitResult:
        return self.fitter.fit(batch)

    def describe(self) -> dict[str, object]:
        return {"annotator": self.name, **describe_fit_body(self.fitter.body), **describe_config(self.config)}


def _build(name: str, body_model: BodyModel, options: Mapping[str, object], depth_weight: float) -> FittingAnnotator:
    known = set(_CONFIG_OPTIONS) | set(_EXTRA_OPTIONS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"annotator {name!r} does not know options {unknown}; known: {sorted(known)}")
    config_kwargs: dict[str, Any] = {k: v for k, v in options.items() if k in _CONFIG_OPTIONS}
    config_kwargs.setdefault("depth_weight", depth_weight)
    if name == "smplifyx" and float(config_kwargs["depth_weight"]) != 0.0:
        raise ValueError("smplifyx fits 2D keypoints only: use the deposer annotator for a depth term")
    config = FitConfig(**config_kwargs)
    if "iterations" in options:
        factor = float(options["iterations"]) / 100.0  # type: ignore[arg-type]
        config = replace(
            config, stages=tuple(replace(s, iterations=max(1, round(s.iterations * factor))) for s in DEFAULT_STAGES)
        )
    if "adam_iterations" in options:
        config = config.with_adam_iterations(int(options["adam_iterations"]))  # type: ignore[arg-type]
    cache_dir = options.get("cache_dir")
    if cache_dir is None:
        from pchmr.core.kit.cache import default_cache_dir

        cache_dir = str(default_cache_dir())
    return FittingAnnotator(name, body_model, config, str(options.get("pose_prior", "gmm")),
                            options.get("pose_prior_file"), str(cache_dir))  # type: ignore[arg-type]  # fmt: skip


def make_smplifyx(body_model: BodyModel, options: Mapping[str, object] | None = None) -> FittingAnnotator:
    """SMPLify-X-style fit to 2D keypoints only."""
    return _build("smplifyx", body_model, options or {}, 0.0)


def make_deposer(body_model: BodyModel, options: Mapping[str, object] | None = None) -> FittingAnnotator:
    """DePoser: 2D keypoints plus SILog on per-keypoint depth."""
    return _build("deposer", body_model, options or {}, DEPOSER_DEPTH_WEIGHT)


@hookimpl
def pchmr_annotators() -> Mapping[str, Callable[..., FittingAnnotator]]:
    return {"smplifyx": make_smplifyx, "deposer": make_deposer}

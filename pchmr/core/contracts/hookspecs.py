"""One pluggy hook per plugin kind.

Every hook is called once, when the :class:`~pchmr.core.engine.registry.Registry` loads, with no
arguments, and returns a mapping ``{name: factory}``. The registry merges the mappings of
all plugins (built-in and third-party alike, all discovered through the ``pchmr``
entry-point group) and refuses two plugins offering the same name for one kind.

Names are lower-case, may contain ``-``, and are what users type: ``--backbone fastmetro``.
A factory is cheap to hold; the expensive work (building a model, reading data) happens when
the core calls it.

Options. A factory that takes ``key=value`` options (every kind below names where they arrive)
declares them as the attribute ``options``: a frozen dataclass whose fields are made with
:func:`~pchmr.core.contracts.options.option` (:class:`~pchmr.core.contracts.options.NoOptions`
for none), and reads them with :func:`~pchmr.core.contracts.options.read_options`. The engine
checks a run's options through that class before any data is prepared, and ``pchmr plugins
--options NAME`` prints it. The attribute is optional: a factory without it receives its options
unchecked (see :mod:`pchmr.core.contracts.options`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # the contracts, for readers and type checkers
    from pchmr.core.contracts.annotation import (
        AnnotatorFactory,
        DepthSource,
        KeypointSource,
    )
    from pchmr.core.contracts.attack import AttackFactory
    from pchmr.core.contracts.backbone import BackboneFactory
    from pchmr.core.contracts.dataset import DatasetFactory
    from pchmr.core.contracts.partition import Partitioner
    from pchmr.core.contracts.strategy import PrivacyFactory, StrategyFactory

PROJECT = "pchmr"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["KINDS", "PROJECT", "hookimpl", "hookspec"]


@hookspec
def pchmr_backbones() -> Mapping[str, BackboneFactory]:
    """Offer HMR backbones.

    A factory ``(body_model: BodyModel, options: BackboneOptions) -> Backbone`` returns an
    ``nn.Module`` whose forward maps images (B, 3, H, W), normalised crops with
    H = W = ``options.input_size``, to :class:`~pchmr.core.contracts.backbone.HMROutput`:

    * joints   (B, J, 3)   metres, camera-frame axes, J = ``body_model.num_joints``
    * vertices [(B, V_l, 3) per pyramid level, coarse first]  metres
    * camera   (B, 3)      weak perspective (s, tx, ty) onto crop coordinates [-1, 1]

    Options: ``options.extra`` (``--backbone-option``), declared by ``factory.options``.
    """


@hookspec
def pchmr_body_models() -> Mapping[str, Callable[..., object]]:
    """Offer body models.

    A factory ``(spec: BodyModelSpec) -> BodyModel`` returns a
    :class:`~pchmr.core.contracts.bodymodel.BodyModel`: faces, a differentiable forward in metres
    (y up), the evaluation joint set and the cached mesh pyramid. Options: ``spec.extra``,
    declared by ``factory.options``.
    """


@hookspec
def pchmr_datasets() -> Mapping[str, DatasetFactory]:
    """Offer datasets.

    A factory ``(spec: DatasetSpec, body_model: BodyModel) -> HMRData`` prepares the data once
    (cached under ``spec.cache_dir``) and returns train/test splits of Samples in the schema of
    :mod:`pchmr.core.contracts.sample` plus the ``meta`` labels of the train split. Options:
    ``spec.options``, declared by ``factory.options``.
    """


@hookspec
def pchmr_partitioners() -> Mapping[str, Partitioner]:
    """Offer client partitioners.

    A partitioner ``(data: HMRData, num_clients, seed, options) -> Partition`` splits
    training-sample indices into ``num_clients`` disjoint, non-empty client sets, deterministically
    from ``seed``, reading ``data.labels`` (and ``data.train`` for feature-based partitioners);
    see :mod:`pchmr.core.contracts.partition`. Options: ``options`` (``--partition-option``),
    declared by ``partitioner.options``.
    """


@hookspec
def pchmr_strategies() -> Mapping[str, StrategyFactory]:
    """Offer federated aggregation strategies.

    A factory ``(config: StrategyConfig) -> StrategyParts`` returns the Flower server strategy
    and whatever the client side must add (loss terms, client mods); see
    :mod:`pchmr.core.contracts.strategy`. Options: ``config.options`` (``--strategy-option``),
    declared by ``factory.options``.
    """


@hookspec
def pchmr_privacy() -> Mapping[str, PrivacyFactory]:
    """Offer privacy mechanisms (secure aggregation, differential privacy).

    A factory ``(parts: StrategyParts, config: StrategyConfig) -> StrategyParts`` wraps an
    aggregation strategy it is compatible with, and raises
    :class:`~pchmr.core.contracts.strategy.IncompatibleError` with the reason otherwise.
    Options: ``config.options`` (``--privacy-option``), declared by ``factory.options``.
    """


@hookspec
def pchmr_annotators() -> Mapping[str, AnnotatorFactory]:
    """Offer annotators (see :mod:`pchmr.core.contracts.annotation`).

    A factory ``(body_model: BodyModel, options: Mapping[str, object]) -> Annotator`` refuses
    unknown option keys, naming the known ones (``--option``, declared by ``factory.options``). ``Annotator.fit(batch: ObservationBatch)``
    fits the body model to B images at once and returns a ``FitResult``:

    * input  keypoints (B, J, 3) crop coordinates [-1, 1] + confidence; intrinsics (B, 3)
      (f, cx, cy) in crop units; depth, depth_valid (B, J), known up to the batch's
      ``depth_invariance`` (``metric``, ``scale`` or ``affine``);
    * output vertices (B, V, 3), joints (B, J, 3) metres, camera frame (x right, y down,
      z forward), root-relative; translation (B, 3) metres; losses {name: (B,)} per image.

    Images an annotator cannot use are the pipeline's business (records with the error), so
    ``fit`` only sees valid observations.
    """


@hookspec
def pchmr_keypoint_sources() -> Mapping[str, Callable[..., KeypointSource]]:
    """Offer 2D keypoint sources: ``factory(**options) -> KeypointSource`` (the ``files`` source
    also takes the directory first); options (``--keypoint-option``) declared by ``factory.options``.

    ``source(item: AnnotationItem, joint_names) -> KeypointObservation``: (J, 3) keypoints in
    the body model's evaluation joint order, **image pixels** (continuous coordinates) and a
    confidence in [0, 1]; intrinsics (focal, u0, v0) in pixels or None. Raises
    ``NoPersonError`` / ``KeypointLayoutError`` / ``CountMismatchError`` naming the image.
    """


@hookspec
def pchmr_depth_sources() -> Mapping[str, Callable[..., DepthSource]]:
    """Offer per-keypoint depth sources: ``factory(**options) -> DepthSource`` (the ``files``
    source also takes the directory first); options (``--depth-option``) declared by ``factory.options``.

    ``source(item: AnnotationItem, keypoints (J, 3) pixels) -> DepthObservation``: (J,) depth
    per keypoint (positive), (J,) validity in {0, 1}, and the invariance the values are known
    up to (``metric``, ``scale``, ``affine``). Raises ``DepthError`` naming the image when too
    many keypoints lack a finite positive depth.
    """


@hookspec
def pchmr_attacks() -> Mapping[str, AttackFactory]:
    """Offer privacy attacks for ``pchmr audit`` (see :mod:`pchmr.core.contracts.attack`).

    A factory ``(options: Mapping[str, object]) -> Attack`` refuses unknown or bad options
    (``--attack-option``, declared by ``factory.options``). ``attack.run(target)`` audits one
    finished run through the :class:`~pchmr.core.contracts.attack.AuditTarget` the engine builds
    from its directory (the models, the data, a client's update and what the server receives of it
    under each privacy setting) and returns an :class:`~pchmr.core.contracts.attack.AttackReport`:
    labelled measurements, per-trial rows, pictures.
    """


#: plugin kind → hook name; the registry and ``pchmr plugins`` iterate over it.
KINDS: dict[str, str] = {
    "backbone": "pchmr_backbones",
    "body_model": "pchmr_body_models",
    "dataset": "pchmr_datasets",
    "partitioner": "pchmr_partitioners",
    "strategy": "pchmr_strategies",
    "privacy": "pchmr_privacy",
    "annotator": "pchmr_annotators",
    "keypoint_source": "pchmr_keypoint_sources",
    "depth_source": "pchmr_depth_sources",
    "attack": "pchmr_attacks",
}

"""The plugin author's whole surface: every contract a plugin implements or receives, and every
helper it may use, under one flat namespace.

.. code-block:: python

    from pchmr.api import Backbone, BackboneOptions, HMROutput, hookimpl

Names resolve lazily (PEP 562): importing this module imports nothing, and each name imports
its home module (``pchmr.core.contracts.*`` or ``pchmr.core.kit.*``) on first use, so a plugin
module that needs ``hookimpl`` alone does not pay for torchmetrics. Nothing here reaches the
engine (``pchmr.core.engine``): a plugin that works with this surface works with any engine
version that keeps these contracts. Contract suites for every plugin kind are in
:mod:`pchmr.testing`; ``docs/plugins.md`` documents each hook.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    # ruff: noqa: F401 (re-exported through _EXPORTS and __all__)
    from pchmr.core.contracts.annotation import (
        DEPTH_INVARIANCES,
        AnnotationInputError,
        AnnotationItem,
        AnnotationRecord,
        Annotator,
        AnnotatorFactory,
        CountMismatchError,
        DepthError,
        DepthObservation,
        DepthSource,
        DeviceAnnotator,
        FitResult,
        KeypointLayoutError,
        KeypointObservation,
        KeypointSource,
        NoPersonError,
        Observation,
        ObservationBatch,
        pixels_to_crop,
    )
    from pchmr.core.contracts.attack import (
        THREAT_MODELS,
        Attack,
        AttackFactory,
        AttackReport,
        AuditSamples,
        AuditTarget,
        Measurement,
        ServerView,
    )
    from pchmr.core.contracts.backbone import (
        Backbone,
        BackboneFactory,
        BackboneOptions,
        HMROutput,
        InputError,
        check_images,
    )
    from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec, BodyOutput, MeshPyramid, sparse_bmm
    from pchmr.core.contracts.dataset import (
        DatasetFactory,
        DatasetSpec,
        ExpectedFile,
        FileChecker,
        HMRData,
        label_values,
    )
    from pchmr.core.contracts.errors import DatasetFormatError, OptionError
    from pchmr.core.contracts.hookspecs import KINDS, PROJECT, hookimpl
    from pchmr.core.contracts.mechanism import Mechanism, RoundContext
    from pchmr.core.contracts.options import (
        DeclaresOptions,
        NoOptions,
        OptionInfo,
        declared_options,
        describe_options,
        option,
        option_error,
        read_options,
    )
    from pchmr.core.contracts.partition import (
        ExplainedPartitioner,
        Partition,
        Partitioner,
        PartitionError,
        load_partition,
        save_partition,
    )
    from pchmr.core.contracts.sample import (
        IMAGE_MEAN,
        IMAGE_STD,
        META_KEYS,
        OPTIONAL_SAMPLE_KEYS,
        SAMPLE_KEYS,
        SampleError,
        denormalize_image,
        normalize_image,
        validate_sample,
    )
    from pchmr.core.contracts.strategy import (
        STAGE_KEY,
        ClientHandler,
        ClientMod,
        ClientRuntime,
        IncompatibleError,
        PrivacyBudgetExhausted,
        PrivacyFactory,
        RoundProtocol,
        RoundResult,
        StrategyConfig,
        StrategyFactory,
        StrategyParts,
        UpdateInfo,
    )
    from pchmr.core.kit.accounting import (
        DEFAULT_ORDERS,
        RDPAccountant,
        epsilon,
        epsilon_from_rdp,
        noise_multiplier_for_epsilon,
        rdp_curve,
        rdp_sampled_gaussian,
    )
    from pchmr.core.kit.cache import default_cache_dir
    from pchmr.core.kit.encoders import (
        ENCODERS,
        NORMS,
        FeatureEncoder,
        ResNet50Encoder,
        SmallEncoder,
        build_encoder,
        load_encoder_weights,
    )
    from pchmr.core.kit.federation import (
        failure_message,
        flower_sampling_kwargs,
        message_stage,
        ordered_replies,
        short_reason,
        state_nbytes,
        wait_for_nodes,
    )
    from pchmr.core.kit.geometry import project_weak_perspective
    from pchmr.core.kit.joints import (
        ALIGNMENTS,
        COCO_17,
        FALLBACKS,
        H36M_17,
        H36M_REGRESSOR,
        J24,
        J24_PELVIS,
        JOINT_SETS,
        LSP_14,
        MPII_16,
        OPENPOSE_18,
        OPENPOSE_25,
        PROTOCOLS,
        SMPL_24,
        AppliedProtocol,
        EvalProtocol,
        JointSetError,
        ProtocolFallbackWarning,
        apply_protocol,
        candidate_indices,
        get_joint_set,
        get_protocol,
        remap,
        root_relative,
    )
    from pchmr.core.kit.metrics import (
        MPJPE,
        MPVPE,
        PAMPJPE,
        PCK,
        PCK_THRESHOLD_M,
        MeanPerSampleError,
        mpjpe,
        mpvpe,
        pa_mpjpe,
        pck,
        procrustes_align,
        root_align,
    )
    from pchmr.core.kit.pseudo_labels import LabelDirectory, read_label_directory
    from pchmr.core.kit.pyramid import (
        DEFAULT_LEVEL_SIZES,
        PYRAMID_METHOD,
        PYRAMID_VERSION,
        build_pyramid,
        cached_pyramid,
        load_graphcmr_downsampling,
        mesh_adjacency,
    )
    from pchmr.core.kit.safe_pickle import (
        NUMPY_PICKLE,
        SPARSE_PICKLE,
        PickleAllowlist,
        UnsafeFileError,
        safe_load,
        safe_load_npz,
    )
    from pchmr.core.kit.seeds import derive_seed
    from pchmr.core.kit.state import fixed_state_keys, trainable_state_keys, training_mode
    from pchmr.core.kit.store import (
        STORE_VERSION,
        ChecksumMismatchError,
        ChunkSpec,
        IncompleteStoreError,
        PreparedStore,
        StoreError,
        file_sha256,
        prepare_store,
        store_key,
    )
    from pchmr.core.kit.transformer import (
        DecoderLayer,
        Dropout,
        EncoderDecoder,
        EncoderLayer,
        MultiHeadAttention,
        fast_dropout,
        sine_position_encoding,
    )

#: name → its home module under ``pchmr.core``
_EXPORTS: dict[str, str] = {
    # contracts.attack
    "THREAT_MODELS": "contracts.attack",
    "Attack": "contracts.attack",
    "AttackFactory": "contracts.attack",
    "AttackReport": "contracts.attack",
    "AuditSamples": "contracts.attack",
    "AuditTarget": "contracts.attack",
    "Measurement": "contracts.attack",
    "ServerView": "contracts.attack",
    # contracts.hookspecs
    "PROJECT": "contracts.hookspecs",
    "hookimpl": "contracts.hookspecs",
    "KINDS": "contracts.hookspecs",
    # contracts.errors
    "DatasetFormatError": "contracts.errors",
    "OptionError": "contracts.errors",
    # contracts.options
    "DeclaresOptions": "contracts.options",
    "NoOptions": "contracts.options",
    "OptionInfo": "contracts.options",
    "declared_options": "contracts.options",
    "describe_options": "contracts.options",
    "option": "contracts.options",
    "option_error": "contracts.options",
    "read_options": "contracts.options",
    # contracts.sample
    "IMAGE_MEAN": "contracts.sample",
    "IMAGE_STD": "contracts.sample",
    "META_KEYS": "contracts.sample",
    "OPTIONAL_SAMPLE_KEYS": "contracts.sample",
    "SAMPLE_KEYS": "contracts.sample",
    "SampleError": "contracts.sample",
    "normalize_image": "contracts.sample",
    "denormalize_image": "contracts.sample",
    "validate_sample": "contracts.sample",
    # contracts.bodymodel
    "BodyModel": "contracts.bodymodel",
    "BodyModelSpec": "contracts.bodymodel",
    "BodyOutput": "contracts.bodymodel",
    "MeshPyramid": "contracts.bodymodel",
    "sparse_bmm": "contracts.bodymodel",
    # contracts.backbone
    "Backbone": "contracts.backbone",
    "BackboneOptions": "contracts.backbone",
    "BackboneFactory": "contracts.backbone",
    "HMROutput": "contracts.backbone",
    "InputError": "contracts.backbone",
    "check_images": "contracts.backbone",
    # contracts.dataset
    "DatasetSpec": "contracts.dataset",
    "HMRData": "contracts.dataset",
    "DatasetFactory": "contracts.dataset",
    "ExpectedFile": "contracts.dataset",
    "FileChecker": "contracts.dataset",
    "label_values": "contracts.dataset",
    # contracts.partition
    "ExplainedPartitioner": "contracts.partition",
    "Partition": "contracts.partition",
    "Partitioner": "contracts.partition",
    "PartitionError": "contracts.partition",
    "save_partition": "contracts.partition",
    "load_partition": "contracts.partition",
    # contracts.mechanism
    "Mechanism": "contracts.mechanism",
    "RoundContext": "contracts.mechanism",
    # contracts.strategy
    "IncompatibleError": "contracts.strategy",
    "PrivacyBudgetExhausted": "contracts.strategy",
    "RoundProtocol": "contracts.strategy",
    "RoundResult": "contracts.strategy",
    "UpdateInfo": "contracts.strategy",
    "ClientHandler": "contracts.strategy",
    "ClientMod": "contracts.strategy",
    "ClientRuntime": "contracts.strategy",
    "STAGE_KEY": "contracts.strategy",
    "StrategyConfig": "contracts.strategy",
    "StrategyParts": "contracts.strategy",
    "StrategyFactory": "contracts.strategy",
    "PrivacyFactory": "contracts.strategy",
    # contracts.annotation
    "DEPTH_INVARIANCES": "contracts.annotation",
    "AnnotationInputError": "contracts.annotation",
    "AnnotationItem": "contracts.annotation",
    "AnnotationRecord": "contracts.annotation",
    "Annotator": "contracts.annotation",
    "AnnotatorFactory": "contracts.annotation",
    "CountMismatchError": "contracts.annotation",
    "DepthError": "contracts.annotation",
    "DepthObservation": "contracts.annotation",
    "DepthSource": "contracts.annotation",
    "DeviceAnnotator": "contracts.annotation",
    "FitResult": "contracts.annotation",
    "KeypointLayoutError": "contracts.annotation",
    "KeypointObservation": "contracts.annotation",
    "KeypointSource": "contracts.annotation",
    "NoPersonError": "contracts.annotation",
    "Observation": "contracts.annotation",
    "ObservationBatch": "contracts.annotation",
    "pixels_to_crop": "contracts.annotation",
    # kit.joints
    "ALIGNMENTS": "kit.joints",
    "AppliedProtocol": "kit.joints",
    "COCO_17": "kit.joints",
    "EvalProtocol": "kit.joints",
    "FALLBACKS": "kit.joints",
    "H36M_17": "kit.joints",
    "H36M_REGRESSOR": "kit.joints",
    "J24": "kit.joints",
    "J24_PELVIS": "kit.joints",
    "JOINT_SETS": "kit.joints",
    "LSP_14": "kit.joints",
    "MPII_16": "kit.joints",
    "OPENPOSE_18": "kit.joints",
    "OPENPOSE_25": "kit.joints",
    "PROTOCOLS": "kit.joints",
    "SMPL_24": "kit.joints",
    "JointSetError": "kit.joints",
    "ProtocolFallbackWarning": "kit.joints",
    "apply_protocol": "kit.joints",
    "candidate_indices": "kit.joints",
    "get_joint_set": "kit.joints",
    "get_protocol": "kit.joints",
    "remap": "kit.joints",
    "root_relative": "kit.joints",
    # kit.metrics
    "PCK_THRESHOLD_M": "kit.metrics",
    "root_align": "kit.metrics",
    "procrustes_align": "kit.metrics",
    "mpjpe": "kit.metrics",
    "pa_mpjpe": "kit.metrics",
    "mpvpe": "kit.metrics",
    "pck": "kit.metrics",
    "MeanPerSampleError": "kit.metrics",
    "MPJPE": "kit.metrics",
    "PAMPJPE": "kit.metrics",
    "MPVPE": "kit.metrics",
    "PCK": "kit.metrics",
    # kit.geometry
    "project_weak_perspective": "kit.geometry",
    # kit.pseudo_labels
    "LabelDirectory": "kit.pseudo_labels",
    "read_label_directory": "kit.pseudo_labels",
    # kit.pyramid
    "DEFAULT_LEVEL_SIZES": "kit.pyramid",
    "PYRAMID_METHOD": "kit.pyramid",
    "PYRAMID_VERSION": "kit.pyramid",
    "build_pyramid": "kit.pyramid",
    "cached_pyramid": "kit.pyramid",
    "load_graphcmr_downsampling": "kit.pyramid",
    "mesh_adjacency": "kit.pyramid",
    # kit.safe_pickle
    "NUMPY_PICKLE": "kit.safe_pickle",
    "SPARSE_PICKLE": "kit.safe_pickle",
    "PickleAllowlist": "kit.safe_pickle",
    "UnsafeFileError": "kit.safe_pickle",
    "safe_load": "kit.safe_pickle",
    "safe_load_npz": "kit.safe_pickle",
    # kit.store
    "STORE_VERSION": "kit.store",
    "ChecksumMismatchError": "kit.store",
    "ChunkSpec": "kit.store",
    "IncompleteStoreError": "kit.store",
    "PreparedStore": "kit.store",
    "StoreError": "kit.store",
    "file_sha256": "kit.store",
    "prepare_store": "kit.store",
    "store_key": "kit.store",
    # kit.accounting
    "DEFAULT_ORDERS": "kit.accounting",
    "RDPAccountant": "kit.accounting",
    "epsilon": "kit.accounting",
    "epsilon_from_rdp": "kit.accounting",
    "noise_multiplier_for_epsilon": "kit.accounting",
    "rdp_sampled_gaussian": "kit.accounting",
    "rdp_curve": "kit.accounting",
    # kit.encoders
    "ENCODERS": "kit.encoders",
    "NORMS": "kit.encoders",
    "FeatureEncoder": "kit.encoders",
    "SmallEncoder": "kit.encoders",
    "ResNet50Encoder": "kit.encoders",
    "build_encoder": "kit.encoders",
    "load_encoder_weights": "kit.encoders",
    # kit.transformer
    "Dropout": "kit.transformer",
    "MultiHeadAttention": "kit.transformer",
    "EncoderLayer": "kit.transformer",
    "DecoderLayer": "kit.transformer",
    "EncoderDecoder": "kit.transformer",
    "fast_dropout": "kit.transformer",
    "sine_position_encoding": "kit.transformer",
    # kit.state
    "fixed_state_keys": "kit.state",
    "trainable_state_keys": "kit.state",
    "training_mode": "kit.state",
    # kit.federation
    "state_nbytes": "kit.federation",
    "message_stage": "kit.federation",
    "failure_message": "kit.federation",
    "ordered_replies": "kit.federation",
    "flower_sampling_kwargs": "kit.federation",
    "short_reason": "kit.federation",
    "wait_for_nodes": "kit.federation",
    # kit.seeds
    "derive_seed": "kit.seeds",
    # kit.cache
    "default_cache_dir": "kit.cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    home = _EXPORTS.get(name)
    if home is None:
        raise AttributeError(f"pchmr.api has no {name!r}; the plugin surface is pchmr.api.__all__")
    value = getattr(importlib.import_module(f"pchmr.core.{home}"), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return __all__

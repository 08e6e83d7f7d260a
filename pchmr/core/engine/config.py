"""``RunConfig``: every option of one experiment, validated up front and saved with the run.

Bad values are refused here, before any data is prepared or any model is built, with a
:class:`ConfigError` naming the option, the value and what is allowed.
"""

from __future__ import annotations

import contextvars
import dataclasses
import ipaddress
import json
import math
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pchmr.core.engine.packaged_configs import PackagedConfigError, resolve_config_path
from pchmr.core.engine.run_options import (
    KeyValues,
    NameAndPath,
    NotOnCli,
    PathValue,
    Repeated,
    Shortcut,
    Switch,
    run_option,
)

if TYPE_CHECKING:
    from pchmr.core.engine.devices import Placement

__all__ = [
    "CLIENT_OPTIMIZER_STATES",
    "ENGINES",
    "LOGGERS",
    "LR_SCHEDULES",
    "MODES",
    "RESNET50_IMAGENET_URL",
    "ConfigError",
    "RunConfig",
    "apply_scale",
    "check_ray_address",
    "is_loopback",
    "load_config_file",
    "resolve_channels_last",
    "value_type_problem",
]

ENGINES = ("simulation", "deployment")
#: What a client does with its AdamW state between the rounds it is sampled in.
CLIENT_OPTIMIZER_STATES = ("reset", "keep")
MODES = ("federated", "centralized", "naive")
#: Experiment trackers ``--logger`` names: Lightning's CSV, TensorBoard and MLflow loggers (pchmr.core.engine.tracking).
LOGGERS = ("csv", "tensorboard", "mlflow")
#: Learning-rate schedules over rounds (federated) or epochs (baselines); pchmr.core.engine.trainer.lr_factor.
LR_SCHEDULES = ("cosine", "constant")
#: The encoder whose training step channels-last memory measured faster on the CPU (1.18-1.26x;
#: the small CNN's gain was within noise): ``channels_last`` unset means on for it alone.
CHANNELS_LAST_ENCODER = "resnet50"
#: Values of ``encoder_weights`` meaning "from scratch" (a TOML file cannot write None).
NO_ENCODER_WEIGHTS = ("none", "scratch")
#: The value of ``eval_datasets`` meaning its default, every member with 3D joints (a TOML file cannot write None).
ALL_EVAL_DATASETS = "all"
#: torchvision's ImageNet ResNet-50 (``ResNet50_Weights.IMAGENET1K_V1``, what ``resnet50(pretrained=True)``
#: loads, as FastMETRO's training code does): named when a ``resnet50`` run's weights file is missing.
#: pchmr never downloads it.
RESNET50_IMAGENET_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
#: The encoder whose weights file is torchvision's ImageNet ResNet-50.
IMAGENET_ENCODER = "resnet50"
#: Set while :meth:`RunConfig.from_saved` reads a run directory's config: the files it names (weights,
#: the model it started from) were checked when the run started, and reading the config again (a
#: report, a client on another node, a resume) needs none of them.
_READING_SAVED: contextvars.ContextVar[bool] = contextvars.ContextVar("pchmr_reading_saved_config", default=False)

# The only built-in plugins the engine names, besides RunConfig's defaults below:
#: the dataset plugin that combines a comma-separated ``--dataset`` list (each sample's ``source``
#: label is its member's name);
MIXED_DATASET = "mixed"
#: the dataset plugin that renders the public split ``--encoder-weights public`` pretrains on, and
#: the body model it renders whatever the run's (SMPL cannot drive the generator; the pretraining
#: head is discarded anyway).
PUBLIC_DATASET = "synthetic"
PUBLIC_BODY_MODEL = "anny"


class ConfigError(ValueError):
    """An option has a value pchmr cannot run with."""


@dataclass(frozen=True)
class RunConfig:
    """One experiment. Defaults are the embedded default run: synthetic data at 64 px,
    FastMETRO-S over a frozen public-pretrained CNN, FedAvg over 10 IID clients (2 per round,
    3 rounds of 2 local epochs at batch 8), a few minutes on 2 CPU cores.

    Each field is declared once, with its ``pchmr run`` flag and help (:func:`run_option`); the
    field order is ``config.json``'s."""

    # what to train
    backbone: str = run_option("fastmetro", help="HMR backbone plugin.")
    variant: str = run_option("S", help="Backbone size: S, M or L.")
    encoder: str = run_option("small", help="CNN feature encoder of the backbone: small (for CPUs) or resnet50.")
    backbone_options: Mapping[str, Any] = run_option(  # plugin-specific: BackboneOptions.extra
        factory=dict,
        flag="--backbone-option",
        cli=KeyValues(),
        help="Backbone option key=value (repeatable), e.g. encoder_norm=group, keep_ratio=0.5.",
    )
    init_from: str | None = run_option(
        None,
        cli=PathValue(),
        help="Start from a trained model: a run directory (its model.pt) or a model file (fine-tuning).",
    )
    # "public": pchmr.core.engine.pretrain; None (a TOML file writes "none"): from scratch
    encoder_weights: str | None = run_option(
        "public",
        help="CNN initialisation: 'public' (pretrained once on a public synthetic split, cached; the stand-in "
        "for ImageNet), a weights file in torchvision's layout (e.g. ImageNet ResNet-50), or 'none' (from scratch).",
    )
    freeze_encoder: bool | None = run_option(
        None,
        cli=Switch(off="--train-encoder"),
        help="Keep the CNN fixed (no gradients, BatchNorm statistics kept) or train it too "
        "(default: fixed exactly when pretrained weights are loaded, not when --init-from replaces the whole model).",
    )
    input_size: int = run_option(64, help="Square crop side in pixels.")
    body_model: str = run_option("anny", help="Body model plugin.")
    smpl_dir: str | None = run_option(
        None,
        cli=PathValue(),
        help="Folder with your own SMPL model files (for --body-model smpl; licence-restricted, never shipped).",
    )
    dataset: str = run_option(
        "synthetic", cli=NameAndPath(path_field="dataset_path"), help="Dataset plugin, NAME or NAME:PATH."
    )
    dataset_path: str | None = run_option(
        None, cli=NotOnCli("the PATH of --dataset NAME:PATH"), help="Where the dataset plugin reads its files."
    )
    dataset_options: Mapping[str, Any] = run_option(
        factory=dict,
        flag="--dataset-option",
        cli=KeyValues(),
        help="Dataset option key=value (repeatable), e.g. 2d-only=outdoor,sports (synthetic: those sources' "
        "training samples keep their 2D keypoints only).",
    )
    num_train: int | None = run_option(
        None, help="Training samples to use (all of the dataset when unset; synthetic renders 2000)."
    )
    num_test: int | None = run_option(None, help="Test samples to use (all when unset; synthetic renders 200).")
    eval_datasets: str | None = run_option(
        None,
        help="A mixed --dataset A,B,C: the members whose test splits the model is evaluated on, comma-separated "
        "(default, or 'all': every member whose test split has 3D joints), e.g. h36m for the PCHMR paper's "
        "Human3.6M (protocol 2) evaluation of its mixed-set experiments.",
    )
    # how to federate
    mode: str = run_option(  # baselines: pchmr.core.engine.baselines
        "federated", help="federated, or a baseline: centralized, naive."
    )
    epochs: int = run_option(5, help="Baselines: training epochs.")
    fraction: float = run_option(
        0.1, help="Naive baseline: share of the training data on the single device (0.05, 0.10, 0.20)."
    )
    partitioner: str = run_option("iid", help="Client partitioner plugin.")
    partition_options: Mapping[str, Any] = run_option(
        factory=dict, flag="--partition-option", cli=KeyValues(), help="Partitioner option key=value (repeatable)."
    )
    strategy: str = run_option("fedavg", help="Aggregation strategy plugin.")
    strategy_options: Mapping[str, Any] = run_option(
        factory=dict,
        flag="--strategy-option",
        cli=KeyValues(shortcuts=(Shortcut("server-opt", "fedopt/fedgh server optimiser: adam, yogi or adagrad."),)),
        help="Strategy option key=value (repeatable).",
    )
    privacy: str | None = run_option(
        None, help="Privacy plugin wrapping the strategy (e.g. dp, secagg; default: none, plain training)."
    )
    privacy_options: Mapping[str, Any] = run_option(
        factory=dict, flag="--privacy-option", cli=KeyValues(), help="Privacy option key=value (repeatable)."
    )
    clients: int = run_option(10, help="Number of clients N.")
    per_round: int = run_option(2, help="Clients sampled per round k (k <= N).")
    rounds: int = run_option(3, help="Federated rounds.")
    local_epochs: int = run_option(2, help="Local epochs per round.")
    client_optimizer: str = run_option(
        "reset",
        help="reset (a fresh AdamW every round: stateless clients) or keep (each client keeps its AdamW state "
        "on the device, in Flower's node context, for the next round it is sampled in).",
    )
    min_fit_fraction: float | None = run_option(  # pchmr.core.engine.federation.common.required_replies
        None,
        help="Dropout tolerance: a round aggregates the replies that arrived when at least ceil(F x sampled) "
        "sampled clients trained successfully, else the run stops naming the failed partitions (the last "
        "checkpoint kept). F in (0, 1]; 1 fails on any failure. Unset: at least one reply, Flower's "
        "accept_failures semantics.",
    )
    client_dropout: float = run_option(  # pchmr.core.engine.federation.client.simulated_dropout
        0.0,
        help="Simulated device churn: each sampled client fails its fit with this probability P in [0, 1), "
        "drawn from the run seed, the round and its partition id (reproducible, also on --resume).",
    )
    batch_size: int = run_option(8, help="Local batch size.")
    lr: float = run_option(1e-3, help="AdamW learning rate.")
    lr_schedule: str = run_option(  # pchmr.core.engine.trainer.lr_factor
        "cosine",
        help="Learning rate over rounds (baselines: epochs): cosine, lr · (1 + cos(π (r − 1) / R)) / 2 in round r "
        "of R, or constant.",
    )
    weight_decay: float = run_option(
        1e-4,
        cli=NotOnCli("set in a config file (weight_decay = ...): no experiment of the papers varies it"),
        help="AdamW weight decay.",
    )
    loss_weights: Mapping[str, Any] = run_option(  # overrides of pchmr.core.engine.losses.LossWeights
        factory=dict,
        flag="--loss-weight",
        cli=KeyValues(),
        help="Loss weight override term=value (repeatable): joints_3d, reg_joints_3d, vertices, joints_2d, edge, "
        "normal, mesh_level, or a backbone term such as token_pruning.",
    )
    eval_every: int = run_option(1, help="Evaluate the global model every N rounds (and at the end).")
    engine: str = run_option(  # deployment: pchmr.core.engine.federation.deployment
        "simulation", help="Flower engine: simulation (Ray) or deployment (a SuperLink and SuperNodes)."
    )
    superlink: str | None = run_option(
        None, help="Deployment: HOST:PORT of a running SuperLink (default: start one on loopback)."
    )
    root_certificates: str | None = run_option(
        None, cli=PathValue(), help="Deployment: CA certificate for TLS to the SuperLink."
    )
    insecure: bool = run_option(
        False,
        cli=Switch(off="--no-insecure"),
        help="Deployment: talk to a --superlink that is not on loopback without TLS (plaintext: anyone on the "
        "path reads and alters the models); without it such a SuperLink needs --root-certificates.",
    )
    node_auth: bool = run_option(
        False,
        cli=Switch(off="--no-node-auth"),
        help="Deployment on loopback: the SuperLink pchmr starts speaks TLS and authenticates SuperNodes; pchmr makes a "
        "CA and one key per SuperNode in RUN/deployment/pki, registers the keys and binds partition i to node i's key "
        "(a node claiming a partition whose key it does not hold is refused).",
    )
    node_keys: str | None = run_option(
        None,
        cli=PathValue(),
        help="Deployment with --superlink (started with --enable-supernode-auth): a TOML file binding each partition "
        'id to its SuperNode\'s public key (0 = "node0.pub", paths relative to the file); the server accepts a '
        "partition's claim only from the node registered with that key.",
    )
    ray_address: str | None = run_option(
        None,
        help="Simulation: HOST:PORT of a running Ray cluster to join (its head's GCS port, as `ray start --head "
        "--port` printed) instead of a private Ray on this machine; clients then get the cluster's CPUs and GPUs, "
        "and the run directory must be at the same path on every node. Unset: Ray's RAY_ADDRESS when set.",
    )
    # where it runs: pchmr.core.engine.devices (one helper resolves these into a Placement)
    accelerator: str = run_option(
        "auto",
        help="Where every model of the run trains and is evaluated: auto (a CUDA GPU when torch sees one, else the "
        "CPU), cpu, gpu or mps. Each simulated client and each SuperNode resolves auto on its own machine.",
    )
    devices: int = run_option(
        1, help="Devices per trainer (only 1: each client, baseline and evaluation runs on one device)."
    )
    precision: str = run_option(
        "32-true",
        help="32-true, 16-mixed (float16 autocast, GPU only) or bf16-mixed (bfloat16 autocast, GPU or CPU).",
    )
    client_gpus: float | None = run_option(
        None,
        help="Simulation: the fraction of one GPU each client asks Ray for, in (0, 1] (default: the round's "
        "sampled clients share the GPUs evenly, at most one each).",
    )
    deterministic: bool = run_option(
        False,
        cli=Switch(off="--no-deterministic"),
        help="The same seed on the same GPU gives the same metrics: torch's deterministic algorithms, cuDNN "
        "without autotuning, a fixed cuBLAS workspace (slower; the CPU path is deterministic anyway).",
    )
    channels_last: bool | None = run_option(
        None,
        cli=Switch(off="--no-channels-last"),
        help="Keep the CNN's convolution weights and activations channels-last (NHWC). Unset: on for the resnet50 "
        "encoder (its training step measured 1.18-1.26x as fast on the CPU, benchmarks/channels_last.py), off for small.",
    )
    loader_workers: int = run_option(
        0, help="DataLoader worker processes per loader, training and evaluation (0: load in the process itself)."
    )
    # bookkeeping
    seed: int = run_option(0, help="Seed of partitions, sampling and initialisation.")
    out: str | None = run_option(None, cli=PathValue(), help="Run directory (default runs/<time>-<setting>).")
    cache_dir: str | None = run_option(
        None,
        cli=NotOnCli("set in a config file (cache_dir = ...) or for every command by $PCHMR_CACHE_DIR"),
        help="Where prepared data, mesh pyramids and pretrained encoders are kept (unset: pchmr.core.kit.cache).",
    )
    loggers: tuple[str, ...] = run_option(  # pchmr.core.engine.tracking
        (),
        flag="--logger",
        cli=Repeated(),
        help="Experiment tracker (repeatable): csv, tensorboard (pip install 'pchmr[tensorboard]') or mlflow "
        "(pip install 'pchmr[mlflow]'; $MLFLOW_TRACKING_URI, else a file store). Each evaluated round's rounds.jsonl "
        "values, every client's training loss and img/s and the privacy budget, by round, the config as "
        "hyperparameters, under RUN/logs/KIND.",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "loggers", _check_loggers(self.loggers))
        if isinstance(self.encoder_weights, str) and self.encoder_weights.lower() in NO_ENCODER_WEIGHTS:
            object.__setattr__(self, "encoder_weights", None)
        if isinstance(self.eval_datasets, str) and self.eval_datasets.strip().lower() == ALL_EVAL_DATASETS:
            object.__setattr__(self, "eval_datasets", None)
        self.validate(files=not _READING_SAVED.get())

    @property
    def loads_encoder_weights(self) -> bool:
        """Whether the CNN starts from ``encoder_weights`` (``--init-from`` replaces them all)."""
        return self.encoder_weights is not None and self.init_from is None

    def placement(self) -> Placement:
        """Where this process runs the run's models: :func:`~pchmr.core.engine.devices.resolve_placement`
        of ``accelerator``, ``devices``, ``precision``, ``loader_workers`` and ``deterministic`` on
        this machine (a :class:`~pchmr.core.engine.devices.DeviceError` names what it lacks)."""
        from pchmr.core.engine.devices import resolve_placement  # imports torch: only when placing

        return resolve_placement(
            self.accelerator,
            self.devices,
            self.precision,
            loader_workers=self.loader_workers,
            deterministic=self.deterministic,
        )

    @property
    def uses_channels_last(self) -> bool:
        """``channels_last``, resolved: by default on exactly for the ``resnet50`` encoder."""
        return resolve_channels_last(self.encoder, self.channels_last)

    @property
    def encoder_frozen(self) -> bool:
        """``freeze_encoder``, resolved: by default frozen exactly when pretrained weights are loaded."""
        return self.loads_encoder_weights if self.freeze_encoder is None else self.freeze_encoder

    def validate(self, files: bool = True) -> None:
        """Refuse a bad value (a :class:`ConfigError` naming the option); with ``files``, also a file
        the run reads that is not there (:meth:`check_files`)."""
        for f in dataclasses.fields(self):
            problem = value_type_problem(f.name, getattr(self, f.name))
            if problem:
                raise ConfigError(problem)
        _positive_int("clients", self.clients)
        _positive_int("per-round", self.per_round)
        _positive_int("rounds", self.rounds)
        _positive_int("local-epochs", self.local_epochs)
        _positive_int("batch-size", self.batch_size)
        _positive_int("eval-every", self.eval_every)
        _positive_int("input-size", self.input_size)
        if self.per_round > self.clients:
            raise ConfigError(
                f"--per-round {self.per_round} is more than --clients {self.clients}: "
                "at most every client can be sampled in a round"
            )
        if self.input_size < 32 or self.input_size % 32 != 0:
            raise ConfigError(
                f"--input-size must be a multiple of 32 and >= 32 (64 or 224 usual), got {self.input_size}"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.client_optimizer not in CLIENT_OPTIMIZER_STATES:
            raise ConfigError(
                f"--client-optimizer must be one of {', '.join(CLIENT_OPTIMIZER_STATES)}, got '{self.client_optimizer}'"
            )
        if self.min_fit_fraction is not None and (
            isinstance(self.min_fit_fraction, bool)
            or not isinstance(self.min_fit_fraction, (int, float))
            or not 0.0 < self.min_fit_fraction <= 1.0
        ):
            raise ConfigError(
                "--min-fit-fraction must lie in (0, 1]: the share of a round's sampled clients that must train "
                f"successfully (e.g. 0.5; 1: any failure stops the run; unset: one reply is enough), got {self.min_fit_fraction!r}"
            )
        if (
            isinstance(self.client_dropout, bool)
            or not isinstance(self.client_dropout, (int, float))
            or not 0.0 <= self.client_dropout < 1.0
        ):
            raise ConfigError(
                "--client-dropout must lie in [0, 1): the probability that a sampled client fails its fit "
                f"(e.g. 0.2; 0: no simulated failures), got {self.client_dropout!r}"
            )
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got '{self.engine}'")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        _positive_int("epochs", self.epochs)
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"--fraction must lie in (0, 1] (e.g. 0.05, 0.10, 0.20), got {self.fraction!r}")
        if self.privacy is not None and (not isinstance(self.privacy, str) or not self.privacy):
            raise ConfigError(f"--privacy must name a privacy plugin (e.g. dp, secagg), got {self.privacy!r}")
        if not isinstance(self.dataset_options, Mapping):
            raise ConfigError(f"dataset options must be a table of key = value, got {self.dataset_options!r}")
        if not isinstance(self.privacy_options, Mapping):
            raise ConfigError(f"privacy options must be a table of key = value, got {self.privacy_options!r}")
        if self.privacy_options and self.privacy is None:
            raise ConfigError(
                f"privacy options {sorted(self.privacy_options)} were given without --privacy; "
                "name the privacy plugin they are for"
            )
        if self.privacy is not None and self.mode != "federated":
            raise ConfigError(
                f"--privacy {self.privacy} protects federated training; --mode {self.mode} trains on one "
                "device and has no updates to protect"
            )
        _check_loss_weights(self.loss_weights)
        self._validate_eval_datasets()
        if files:
            self.check_files()
        if self.freeze_encoder is not None and not isinstance(self.freeze_encoder, bool):
            raise ConfigError(f"freeze_encoder must be true or false, got {self.freeze_encoder!r}")
        if self.freeze_encoder and self.encoder_weights is None and self.init_from is None:
            raise ConfigError(
                "--freeze-encoder keeps the CNN fixed, but --encoder-weights none leaves it random: "
                "give pretrained weights ('public' or a file) or --init-from, or train the encoder"
            )
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name.replace("_", "-"), value)
        self._validate_placement()

    def _validate_node_auth(self) -> None:
        if not isinstance(self.node_auth, bool):
            raise ConfigError(f"node_auth must be true or false, got {self.node_auth!r}")
        deployment = self.mode == "federated" and self.engine == "deployment"
        for flag, given in (("--node-auth", self.node_auth), ("--node-keys", self.node_keys is not None)):
            if given and not deployment:
                where = f"--mode {self.mode}" if self.mode != "federated" else f"--engine {self.engine}"
                raise ConfigError(
                    f"{flag} authenticates the Deployment Engine's SuperNodes; {where} has none (use --engine deployment)"
                )
        if self.node_auth and self.superlink is not None:
            raise ConfigError(
                f"--node-auth sets up the SuperLink pchmr starts on loopback; the SuperLink {self.superlink} is "
                "configured by its operator: register each SuperNode's key there (`flwr supernode register`) and give "
                "--node-keys FILE binding the partitions to those keys"
            )
        if self.node_keys is not None:
            if self.superlink is None:
                raise ConfigError(
                    "--node-keys binds partitions to the keys registered at a running SuperLink (--superlink "
                    "HOST:PORT); for the SuperLink pchmr starts on loopback use --node-auth, which makes the keys"
                )
            if self.root_certificates is None:
                raise ConfigError(
                    "--node-keys needs TLS: Flower authenticates SuperNodes only over TLS, so give --root-certificates "
                    "CA.pem (the CA that signed the SuperLink's certificate)"
                )

    def check_files(self) -> None:
        """Refuse a file the run would read that is not there, before any data is read: ``--init-from``
        (a fine-tuning run's trained model; it names the run to make first), ``--encoder-weights`` (a
        ``resnet50`` run's refusal says where to get torchvision's ImageNet file), ``--root-certificates``
        and ``--node-keys`` (read whole: every partition bound to a distinct EC public key)."""
        if self.node_keys is not None and self.engine == "deployment" and self.superlink and self.root_certificates:
            from pchmr.core.engine.federation.nodeauth import NodeKeyError, read_node_keys

            try:
                read_node_keys(self.node_keys, self.clients)
            except NodeKeyError as exc:
                raise ConfigError(str(exc)) from None
        if self.init_from is not None:
            _check_init_from(self.init_from)
        if self.root_certificates is not None and not Path(self.root_certificates).is_file():
            raise ConfigError(
                f"--root-certificates {self.root_certificates} does not exist or is not a file: give the CA "
                "certificate (PEM) that signed the SuperLink's certificate"
            )
        if self.encoder_weights not in (None, "public") and not Path(self.encoder_weights).is_file():
            where = Path(self.encoder_weights).expanduser().absolute()
            text = (
                f"--encoder-weights must be 'public', 'none' or an existing weights file, got "
                f"'{self.encoder_weights}' (no such file: {where})"
            )
            if self.encoder == IMAGENET_ENCODER:  # the papers' initialisation
                text += (
                    f". The resnet50 encoder starts from torchvision's ImageNet ResNet-50 state dict: download "
                    f"{RESNET50_IMAGENET_URL} (IMAGENET1K_V1) yourself, pchmr downloads nothing, and save it as "
                    f"{where}; or run with --encoder-weights public (the CPU stand-in) or none (from scratch)"
                )
            else:
                text += "; give a weights file in torchvision's key layout, 'public' or 'none'"
            raise ConfigError(text)

    def _validate_eval_datasets(self) -> None:
        if self.eval_datasets is None:
            return
        if not isinstance(self.eval_datasets, str):
            raise ConfigError(f"--eval-datasets must name datasets, comma-separated, got {self.eval_datasets!r}")
        chosen = [name.strip() for name in self.eval_datasets.split(",") if name.strip()]
        members = [name.strip() for name in str(self.dataset).split(",") if name.strip()]
        outside = [name for name in chosen if name not in members]
        if not chosen or outside or len(set(chosen)) != len(chosen):
            raise ConfigError(
                f"--eval-datasets must name distinct members of --dataset {self.dataset} (whose test splits are "
                f"evaluated), or be 'all'; got '{self.eval_datasets}'"
                + (f": {', '.join(outside)} not a member" if outside else "")
            )

    def _validate_placement(self) -> None:
        from pchmr.core.engine.devices import DeviceError, check_placement_options  # imports torch

        try:
            check_placement_options(
                self.accelerator, self.devices, self.precision, self.loader_workers, self.client_gpus
            )
        except DeviceError as exc:
            raise ConfigError(str(exc)) from exc
        if self.devices != 1:
            raise ConfigError(
                f"--devices {self.devices}: each trainer of a run uses one device (federated clients share the "
                "GPUs through Ray, see --client-gpus); multi-device data parallelism is not supported, use --devices 1"
            )
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ConfigError(f"channels_last must be true or false (or unset), got {self.channels_last!r}")
        if not isinstance(self.deterministic, bool):
            raise ConfigError(f"deterministic must be true or false, got {self.deterministic!r}")
        if self.mode == "federated" and self.engine == "deployment" and self.superlink is not None:
            if self.insecure and self.root_certificates is not None:
                raise ConfigError("--insecure and --root-certificates contradict each other: give one of them")
            if not self.insecure and self.root_certificates is None and not is_loopback(self.superlink):
                raise ConfigError(
                    f"--superlink {self.superlink} is not on this machine and no --root-certificates is given: the "
                    "models would travel in plaintext, readable and alterable on the way; give --root-certificates "
                    "CA.pem (the CA that signed the SuperLink's certificate) or, to accept that, --insecure"
                )
        self._validate_node_auth()
        if self.ray_address is not None:
            check_ray_address(self.ray_address)
            if self.mode != "federated" or self.engine != "simulation":
                where = f"--mode {self.mode}" if self.mode != "federated" else f"--engine {self.engine}"
                raise ConfigError(
                    f"--ray-address joins a Ray cluster for the Simulation Engine's clients; {where} does not use Ray"
                )
        if self.client_gpus is not None and (self.mode != "federated" or self.engine != "simulation"):
            where = f"--mode {self.mode}" if self.mode != "federated" else f"--engine {self.engine}"
            raise ConfigError(
                f"--client-gpus shares GPUs among the Simulation Engine's clients; {where} has none "
                "(a baseline trains on one device, a SuperNode uses its own)"
            )

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dataset_options"] = dict(self.dataset_options)
        out["partition_options"] = dict(self.partition_options)
        out["strategy_options"] = dict(self.strategy_options)
        out["loss_weights"] = dict(self.loss_weights)
        out["backbone_options"] = dict(self.backbone_options)
        out["privacy_options"] = dict(self.privacy_options)
        return out

    @classmethod
    def from_saved(cls, data: Mapping[str, Any]) -> RunConfig:
        """The config a run directory's ``config.json`` saved (its ``"run"`` table), including
        those written by older pchmr versions, read as they ran: no ``lr_schedule`` key means a
        constant rate; no ``freeze_encoder`` key means the CNN trained unless the backbone option
        of that name (its former home) froze it; no ``accelerator`` key means the CPU (every run
        trained there before the option existed; the other placement keys take their defaults), and no
        ``channels_last`` key means contiguous convolutions. The files it names (``--init-from``,
        ``--encoder-weights``) are not looked for: they served when the run started."""
        upgraded = dict(data)
        upgraded.setdefault("lr_schedule", "constant")
        upgraded.setdefault("accelerator", "cpu")
        upgraded.setdefault("channels_last", False)  # before the option, every CNN ran contiguous
        if "freeze_encoder" not in upgraded:
            options = dict(upgraded.get("backbone_options") or {})
            frozen = options.pop("freeze_encoder", False)
            upgraded["backbone_options"] = options
            upgraded["freeze_encoder"] = frozen if isinstance(frozen, bool) else str(frozen).lower() == "true"
        token = _READING_SAVED.set(True)  # the files it names were there when the run started
        try:
            return cls.from_dict(upgraded)
        finally:
            _READING_SAVED.reset(token)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, check_files: bool = True) -> RunConfig:
        """The config of ``data`` (keys with ``-`` or ``_``), validated; ``check_files=False`` does not
        look for the model files it names (``--init-from``, ``--encoder-weights``): for commands that
        read the config's data or partition without training (``pchmr partition``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        if check_files:
            return cls(**normalised)
        token = _READING_SAVED.set(True)
        try:
            return cls(**normalised)
        finally:
            _READING_SAVED.reset(token)


def value_type_problem(name: str, value: Any) -> str | None:
    """None when ``value`` has the type :class:`RunConfig` field ``name`` holds, else the refusal,
    e.g. ``backbone must be a string (e.g. backbone = "fastmetro"), got 3``: text, true/false and
    tables, as a config file writes them (numbers are checked with their ranges by
    :meth:`RunConfig.validate`). None for a name that is not a field."""
    expected = _FIELD_KINDS.get(name)
    if expected is None:
        return None
    kind, optional, default = expected
    if value is None and optional:
        return None
    unset = " or unset" if optional else ""
    if kind is str and not isinstance(value, str):
        example = f' (e.g. {name} = "{default}")' if isinstance(default, str) else ""
        return f"{name} must be a string{unset}{example}, got {value!r}"
    if kind is bool and not isinstance(value, bool):
        return f"{name} must be true or false, got {value!r}"  # unset: leave the key out
    if kind is Mapping and not isinstance(value, Mapping):
        return f"{name} must be a table of key = value (e.g. {name} = {{ key = 1 }} in a TOML file), got {value!r}"
    return None


def _field_kinds() -> dict[str, tuple[type, bool, Any]]:
    """RunConfig field → (str, bool or Mapping, whether None is allowed, its default) for the fields
    whose type :func:`value_type_problem` checks."""
    import typing

    hints = typing.get_type_hints(RunConfig)
    kinds: dict[str, tuple[type, bool, Any]] = {}
    for f in dataclasses.fields(RunConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if typing.get_origin(base) in (Mapping, dict) or base in (Mapping, dict):
            base = Mapping
        if base in (str, bool, Mapping):
            kinds[f.name] = (base, optional, f.default)
    return kinds


_FIELD_KINDS = _field_kinds()


def _check_loss_weights(weights: Mapping[str, Any]) -> None:
    from pchmr.core.engine.losses import (
        LossWeights,  # imports torch: only when weights are validated
    )

    try:
        LossWeights.from_overrides(weights)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"--loss-weight: {exc} (give term=weight, e.g. edge=500; the terms: pchmr.core.engine.losses)"
        ) from exc


def _check_loggers(loggers: Any) -> tuple[str, ...]:
    """``loggers`` (a name or a list of them) as a tuple of distinct names of :data:`LOGGERS`, in the
    order given; a :class:`ConfigError` naming the choices for anything else."""
    names = [loggers] if isinstance(loggers, str) else loggers
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"--logger must name trackers ({', '.join(LOGGERS)}), got {loggers!r}")
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"--logger must be one of {', '.join(LOGGERS)} (repeatable), got '{unknown[0]}'")
    return tuple(dict.fromkeys(names))


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a whole number >= 1, got {value!r}")


def _check_init_from(init_from: str) -> None:
    """``--init-from`` names a model file or a finished run directory (its ``model.pt``); else a
    :class:`ConfigError` saying what to run first."""
    path = Path(init_from)
    if path.is_file() or (path / "model.pt").is_file():
        return
    head = f"--init-from must be a run directory holding model.pt or a model file, got '{init_from}'"
    if (path / "config.json").is_file():
        raise ConfigError(
            f"{head}: that run has not finished (no model.pt yet); finish it with `pchmr run --resume {init_from}`, "
            "then start this one"
        )
    if path.is_dir():
        raise ConfigError(f"{head}: the directory holds no model.pt")
    raise ConfigError(
        f"{head}, which does not exist yet: this run fine-tunes a trained model, so run the training that makes it "
        f"first, with --out {init_from} (a paper: fine-tuning config names its pretraining config), "
        "then start this one"
    )


def resolve_channels_last(encoder: str, channels_last: bool | None) -> bool:
    """Whether a model with ``encoder`` runs its CNN channels-last: ``channels_last`` when given,
    else exactly for :data:`CHANNELS_LAST_ENCODER`."""
    return encoder == CHANNELS_LAST_ENCODER if channels_last is None else bool(channels_last)


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` (or ``[V6]:PORT``, or a bare host) names this machine's loopback:
    ``localhost``, 127.0.0.0/8, ``::1``."""
    host = address.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ray_address(address: str, given_as: str = "--ray-address") -> str:
    """``address`` when it is HOST:PORT (a Ray head's GCS address, port 1-65535), else a
    :class:`ConfigError` naming where it was ``given_as`` and what is expected. Ray Client's
    ``ray://`` addresses are refused: the clients would run without the run directory's files."""
    host, sep, port = str(address).rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or "/" in host:
        raise ConfigError(
            f"{given_as} must be HOST:PORT of a Ray cluster's head (e.g. 10.0.0.5:6379, the address "
            f"`ray start --head` prints; not a ray:// Ray Client address), got {address!r}"
        )
    return address


def load_config_file(path: str | Path, scale: str | None = None) -> dict[str, Any]:
    """Read a TOML or JSON config file into a flat dict (keys as in :class:`RunConfig`).

    ``path`` is a file's path or a packaged file's reference, ``COLLECTION:NAME`` (e.g.
    ``paper:table01-fastmetro-s-fedavg-10-10-iid``; :mod:`pchmr.core.engine.packaged_configs`).
    A file may hold named scales, tables of overrides under ``scale`` (TOML ``[scale.smoke]``):
    they are dropped unless ``scale`` names one, whose values then replace the file's (a table
    such as ``partition_options`` is merged key by key). See :func:`apply_scale`.
    """
    try:
        path = resolve_config_path(path)
    except PackagedConfigError as exc:
        raise ConfigError(str(exc)) from None
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a TOML or JSON file of options")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as text: {exc}") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of options")
    values = apply_scale(data, scale, str(path))
    for key, value in values.items():  # named with the file here; ranges are checked with the flags given
        problem = value_type_problem(str(key).replace("-", "_"), value)
        if problem:
            raise ConfigError(f"config file {path}: {problem}")
    return values


def apply_scale(data: Mapping[str, Any], scale: str | None, source: str = "the config") -> dict[str, Any]:
    """``data`` without its ``scale`` table, overridden by ``data["scale"][scale]`` when ``scale`` is given.

    Example: ``{"rounds": 2000, "scale": {"smoke": {"rounds": 3}}}`` with ``scale="smoke"`` gives
    ``{"rounds": 3}``; with ``scale=None`` it gives ``{"rounds": 2000}``.
    """
    out = {k: v for k, v in data.items() if k != "scale"}
    scales = data.get("scale", {})
    if not isinstance(scales, Mapping) or not all(isinstance(v, Mapping) for v in scales.values()):
        raise ConfigError(f"{source}: 'scale' must be a table of named override tables, e.g. [scale.smoke]")
    if scale is None:
        return out
    if scale not in scales:
        known = ", ".join(sorted(scales)) or "none"
        raise ConfigError(f"{source} has no scale '{scale}'; its scales are: {known}")
    for key, value in scales[scale].items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out

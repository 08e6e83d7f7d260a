"""The attack contract: a privacy audit of a finished run, ``pchmr audit RUN_DIR --attack NAME``.

An attack plugin measures what leaks from a run to an honest-but-curious party: the server (the
updates it receives, under the run's secure aggregation or differential privacy, or without them)
or whoever holds the final model. It never reads the run's files itself: the engine builds an
:class:`AuditTarget` from the run directory, the one place that knows how the run's clients
trained, what the server received and what the model was trained on, and the attack works through
it. That keeps an attack honest about its threat model (it sees what the target hands it) and
makes it runnable against any backbone, dataset and privacy mechanism.

A factory ``(options: Mapping[str, object]) -> Attack`` declares its options (``--attack-option
key=value``) as ``factory.options`` (:mod:`pchmr.core.contracts.options`) and refuses unknown or
bad ones with an :class:`~pchmr.core.contracts.errors.OptionError`. ``attack.run(target)`` returns
an :class:`AttackReport`; ``pchmr audit`` writes its table, its JSON and its pictures.

Every number an attack reports is labelled: its metric (``auc``, ``tpr@1%fpr``, ``psnr_db``,
``ssim``, ``mpjpe_mm``), the setting it was measured in (``plain``, ``secagg``, ``dp z=1.0``...) and,
through :attr:`AuditTarget.protocol`, the run's data and evaluation protocol.

Only torch and numpy are imported here at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor, nn

__all__ = [
    "THREAT_MODELS",
    "Attack",
    "AttackFactory",
    "AttackReport",
    "AuditSamples",
    "AuditTarget",
    "Measurement",
    "ServerView",
]

#: Who the attacker is: the server of the run (it sees what clients upload) or a holder of the final
#: model (anyone the model is released to).
THREAT_MODELS = ("server", "model-holder")


@dataclass(frozen=True)
class AuditSamples:
    """N samples of the run's data, collated as the model reads them (the keys and units of
    :mod:`pchmr.core.contracts.sample`: ``image`` (N, 3, H, W) normalised, ``joints_3d``,
    ``keypoints_2d``, ``vertices``, ``has_vertices``...).

    ``split`` says where they come from: ``train`` (what the run trained on; ``partition`` is the
    client that holds them in a federated run), ``test`` (never trained on) or ``fresh`` (drawn
    anew from the dataset's distribution: neither; only datasets that can draw, the synthetic one).
    ``ids`` are positions in that split."""

    batch: Mapping[str, Tensor]
    split: str
    ids: tuple[int, ...]
    partition: int | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ServerView:
    """What the server receives in one round from the clients of ``updates``, under ``setting``:

    * ``plain``: each client's update (its new weights minus the global ones), ``uploads[i]``;
    * ``secagg``: each client's masked upload (``uploads[i]``: the update plus pairwise masks that
      cancel only in the sum; without the other clients' keys it is noise) and the revealed sum
      ``total``;
    * ``dp``: each client's clipped, noised update (``uploads[i]``), as the run's ``dp`` mechanism
      at ``placement=client`` sends it, with its ``noise_multiplier`` and ``clip``.

    Tensors are keyed by the model's state-dict names (trainable entries only)."""

    setting: str
    uploads: tuple[Mapping[str, Tensor], ...]
    total: Mapping[str, Tensor] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class AuditTarget(Protocol):
    """A finished run, as an attack may use it (built by the engine from the run directory).

    ``options`` are the run's options (``config.json``'s ``run`` table), ``protocol`` the labels
    every number computed on its data carries, ``seed`` the audit's seed (an attack draws every
    random choice from it)."""

    options: Mapping[str, Any]
    protocol: Mapping[str, Any]
    seed: int

    def global_model(self, which: str = "final") -> nn.Module:
        """A fresh copy of the run's global model in eval mode: ``final`` (``model.pt``) or
        ``initial`` (the weights round 1 started from). ``model(images)`` gives the backbone's
        :class:`~pchmr.core.contracts.backbone.HMROutput`."""
        ...

    def samples(self, split: str, n: int, *, partition: int | None = None, offset: int = 0) -> AuditSamples:
        """``n`` samples of ``split`` (``train``, ``test`` or ``fresh``), the first ``n`` from
        ``offset`` in a fixed order drawn from the audit's seed; ``partition`` restricts ``train``
        to one client's samples."""
        ...

    def member_samples(self, n: int) -> AuditSamples:
        """``n`` samples the final model was trained on (``split`` ``train``): in a federated run,
        samples of clients sampled in at least one round; in a baseline, of the samples it trained on."""
        ...

    def epochs_seen(self) -> int:
        """How many epochs a member sample was trained in, on average over the members (at least 1):
        a federated client's rounds × local epochs, a baseline's epochs."""
        ...

    def per_sample_loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """(N,) the training loss of each sample under ``model``, as the run's clients minimise it
        (the run's loss weights); differentiable in the batch and the model."""
        ...

    def loss_gradient(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, differentiable: bool = False
    ) -> dict[str, Tensor]:
        """The gradient of the batch's mean training loss with respect to ``model``'s trainable
        weights (state-dict names); ``differentiable`` keeps the graph to the batch."""
        ...

    def client_update(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int | None = None, differentiable: bool = False
    ) -> dict[str, Tensor]:
        """The update a client of this run sends after training ``model`` on ``batch``: new minus
        old trainable weights, with the run's optimizer, learning rate and weight decay from a fresh
        optimizer state. ``steps`` full-batch steps (None: the run's local epochs over ``batch`` in
        its batch size). ``differentiable`` keeps the graph to the batch (an attacker simulating a
        client); ``model`` itself is not changed."""
        ...

    def client_round(self, partition: int, which: str = "initial") -> tuple[dict[str, Tensor], AuditSamples]:
        """The update client ``partition`` sends in a round of the run from the ``which`` global
        model (``initial``: round 1), by the run's own local training (its epochs, batches,
        learning rate and mechanisms' losses), and the samples it trained on."""
        ...

    def server_view(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        setting: str,
        *,
        options: Mapping[str, object] | None = None,
        num_examples: Sequence[int] | None = None,
    ) -> ServerView:
        """What the server receives in one round from clients whose updates are ``updates``:
        ``setting`` ``plain`` (no privacy plugin), or a privacy plugin's name, built with
        ``options`` (default: the run's, when the run used that plugin) over the run's strategy,
        which says what its server receives (:meth:`~pchmr.core.contracts.mechanism.Mechanism.server_view`).
        ``num_examples``: each client's sample count (default 1 each)."""
        ...

    def train_model(self, batch: Mapping[str, Tensor], *, epochs: int, seed: int) -> nn.Module:
        """A model trained centrally on ``batch`` from the run's initial weights, with the run's
        optimizer and loss (a shadow or reference model for membership inference)."""
        ...

    def pose_error_mm(self, model: nn.Module, images: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """(N,) MPJPE in mm of ``model``'s prediction on ``images`` against ``batch``'s 3D joints,
        aligned as the run's protocol aligns them."""
        ...

    def to_pixels(self, images: Tensor) -> np.ndarray:
        """(N, H, W, 3) uint8 pictures of normalised ``images`` (for figures and PSNR/SSIM)."""
        ...


@dataclass(frozen=True)
class Measurement:
    """One reported number: ``metric`` in ``setting`` (e.g. ``auc`` in ``dp z=1.0``), its value, a
    95 % interval when the attack computed one, how many trials it averages and anything that
    qualifies it (``baseline``: the value of the attack's chance or reference level)."""

    metric: str
    setting: str
    value: float
    low: float | None = None
    high: float | None = None
    n: int = 1
    notes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackReport:
    """What an attack found: its measurements (the table), per-trial rows (the JSON), pictures
    (name → (H, W, 3) uint8, e.g. true vs recovered images) and what the attacker was given
    (``threat_model``, one of :data:`THREAT_MODELS`, and ``assumptions``, in words)."""

    attack: str
    threat_model: str
    measurements: tuple[Measurement, ...]
    assumptions: tuple[str, ...] = ()
    rows: tuple[Mapping[str, Any], ...] = ()
    pictures: Mapping[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


@runtime_checkable
class Attack(Protocol):
    """An attack, built with its options: ``run(target)`` audits one run."""

    def run(self, target: AuditTarget, progress: Callable[[str], None] | None = None) -> AttackReport: ...


@runtime_checkable
class AttackFactory(Protocol):
    """``factory(options) -> Attack``; options declared as ``factory.options``."""

    def __call__(self, options: Mapping[str, object]) -> Attack: ...

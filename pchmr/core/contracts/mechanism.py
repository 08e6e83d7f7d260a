"""The mechanism contract: an add-on to a strategy (privacy, a proximal term, a server optimiser's
state) as an object whose hooks all default to doing nothing, in the shape of a Lightning
``Callback``.

A strategy is a Flower server strategy plus a list of mechanisms
(:class:`~pchmr.core.contracts.strategy.StrategyParts`); a privacy wrapper appends one
(``parts.with_mechanism(m)``) and the runtime loops over the list for every hook, in list order:

===================  ======  ==============================================================
hook                 where   how the runtime combines the mechanisms
===================  ======  ==============================================================
``prepare_module``   both    each, in order, on every HMRModule built (server and clients)
``before_round``     server  each, in order; a PrivacyBudgetExhausted stops the run cleanly
``train_config``     server  merged into every round's train config; a key twice is refused
``round_protocol``   server  at most one mechanism may return one (a second is refused)
``round_metrics``    server  merged into the round's record; a key twice is refused
``state_dict``       server  saved by mechanism name in every checkpoint, restored on resume
``client_mods``      client  chained in list order (the first mechanism's first mod outermost)
``client_handlers``  client  merged by stage; a stage twice is refused
``loss``             client  added to the local loss in list order (None adds nothing)
``training_step``    client  the first non-None result replaces HMRModule's step
``transform_update`` client  applied in list order after local training
``server_view``      audit   ``pchmr audit``: what the server receives of k clients' updates
===================  ======  ==============================================================

Per-round state reaches ``loss`` and ``training_step`` as an argument, a :class:`RoundContext`;
nothing is set on the module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keeps plugin discovery from importing Lightning (and Flower)
    from torch import Tensor

    from pchmr.core.contracts.attack import ServerView
    from pchmr.core.contracts.rounds import ClientHandler, ClientMod, RoundProtocol, UpdateInfo

__all__ = ["Mechanism", "RoundContext"]


@dataclass(frozen=True, eq=False)
class RoundContext:
    """One client's local fit in one federated round, as ``loss`` and ``training_step`` receive it.

    ``server_round`` counts from 1; ``partition_id`` is the client's partition; ``local_epochs``
    and ``lr`` are the fit's epochs and learning rate; ``config`` is the round's train config as
    the client received it (``server-round``, ``local-epochs``, ``lr`` and the mechanisms' and the
    server strategy's values, e.g. ``proximal-mu``); ``global_state`` is the state dict the fit
    started from (detached copies: the round's global model, CPU tensors, the module's keys).
    """

    server_round: int
    partition_id: int
    local_epochs: int
    lr: float
    config: Mapping[str, Any]
    global_state: Mapping[str, Tensor]


class Mechanism:
    """An add-on to a strategy; override the hooks it needs, the others do nothing.

    ``name`` (a class attribute, or set in ``__init__``) must be unique among a strategy's
    mechanisms and stable across versions: it keys the mechanism's state in checkpoints and names
    it in errors. It defaults to the class's name.

    Which process calls a hook is in its docstring: *server* hooks run in the ServerApp's process,
    *client* hooks in every client process (a Ray actor or a SuperNode), where the strategy and
    its mechanisms are built again from the run directory; the two never share objects.
    """

    name: str = "Mechanism"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    # -- both sides ------------------------------------------------------------------------
    def describe(self) -> Mapping[str, Any]:
        """JSON-able settings written into the run's ``config.json`` (under ``strategy.mechanisms``,
        with ``name``); called once when the run directory is prepared."""
        return {}

    def prepare_module(self, module: Any) -> None:
        """Called once on every HMRModule the runtime builds (the server's evaluation module, each
        client process's training module), before any round. May raise
        :class:`~pchmr.core.contracts.strategy.IncompatibleError` to refuse the model (e.g. DP-SGD
        with BatchNorm), or adjust ``module.optim``; must not set attributes of its own on it."""

    # -- server ----------------------------------------------------------------------------
    def before_round(self, server_round: int) -> None:
        """Server, before round ``server_round`` (from 1) samples its clients. May raise
        :class:`~pchmr.core.contracts.strategy.PrivacyBudgetExhausted`: the run then stops cleanly
        with the last global model, and the mechanisms after this one are not called."""

    def train_config(self) -> Mapping[str, Any]:
        """Server, every round: values put into the round's train ``ConfigRecord`` (Flower's
        kebab-case keys; ints, floats, strings, bools or bytes), which clients receive and
        :attr:`RoundContext.config` holds."""
        return {}

    def round_protocol(self) -> RoundProtocol | None:
        """Server: a :class:`~pchmr.core.contracts.strategy.RoundProtocol` that runs each round
        *instead of* configure_train → send_and_receive → aggregate_train (e.g. secure
        aggregation), or None. Asked once, when the runtime is built (in every process; only the
        server runs it)."""
        return None

    def round_metrics(self, server_round: int) -> Mapping[str, float | Mapping[str, float]]:
        """Server, after round ``server_round`` (and for the last completed round of a run that
        stops early): numbers merged into that round's ``rounds.jsonl`` record (``-`` becomes
        ``_`` in keys), e.g. ``epsilon``; a value may also be a mapping of names to numbers,
        written as a JSON object (e.g. FedGH's most conflicting layers, name → conflict rate)."""
        return {}

    def state_dict(self) -> Mapping[str, Any]:
        """Server, after every round: what must survive a kill (tensors, numbers, strings, nested
        mappings of them), saved in the checkpoint under this mechanism's name. Empty: nothing.
        The checkpoint is read back with ``torch.load(weights_only=True)``, so it holds only such
        values: NumPy arrays come back as tensors and NumPy scalars as Python numbers; any other
        object is refused, by its key, when the checkpoint is written."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Server, once on ``--resume``, before any round: ``state`` is what :meth:`state_dict`
        returned (after ``torch.save``/``torch.load(weights_only=True)``). The default refuses a non-empty state,
        which a mechanism that keeps none cannot restore."""
        if state:
            raise ValueError(
                f"the checkpoint holds state of mechanism '{self.name}' ({sorted(state)}), which keeps none; "
                "it was written by another version of the mechanism: start a new run"
            )

    # -- client ----------------------------------------------------------------------------
    def client_mods(self) -> Sequence[ClientMod]:
        """Client: Flower client mods ``(msg, context, call_next) -> Message`` wrapped around the
        client's handlers for every message (query, train, protocol stages). Asked once, when the
        runtime is built."""
        return ()

    def client_handlers(self) -> Mapping[str, ClientHandler]:
        """Client: ``{stage: handler}``; a train message whose ConfigRecord has
        :data:`~pchmr.core.contracts.strategy.STAGE_KEY` == stage goes to ``handler(msg, context,
        runtime)`` instead of local training (the client half of a round protocol). Asked once,
        when the runtime is built."""
        return {}

    def loss(self, module: Any, batch: Mapping[str, Tensor], output: Any, context: RoundContext) -> Tensor | None:
        """Client, every local training step: a scalar added to the loss (already weighted), or
        None. ``module`` is the engine's HMRModule, ``batch`` a collated Sample batch, ``output``
        the backbone's HMROutput for it; ``context`` the round being trained."""
        return None

    def training_step(
        self, module: Any, batch: Mapping[str, Tensor], batch_idx: int, context: RoundContext
    ) -> Tensor | None:
        """Client, every local training step: None for HMRModule's own step, or the scalar Lightning
        backpropagates instead (e.g. DP-SGD's surrogate, whose gradient is the privatised one;
        ``module.compute_losses(batch, module(batch["image"]))`` gives the default loss terms).
        The first mechanism that returns a tensor wins; the later ones are not asked."""
        return None

    def transform_update(
        self, new_state: dict[str, Tensor], global_state: dict[str, Tensor], info: UpdateInfo
    ) -> dict[str, Tensor]:
        """Client, after local training, before anything leaves the client: the state to send in
        place of ``new_state`` (e.g. the clipped, noised update), same keys, shapes and dtypes as
        ``global_state`` (the round's global model)."""
        return new_state

    # -- audit -----------------------------------------------------------------------------
    def server_view(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        global_state: Mapping[str, Tensor],
        infos: Sequence[UpdateInfo],
        generator: Any = None,
    ) -> ServerView | None:
        """``pchmr audit`` (no run calls it): what the server receives in one round from the clients
        whose updates (new minus global trainable weights) are ``updates``, under this mechanism, as
        a :class:`~pchmr.core.contracts.attack.ServerView` (its ``setting`` the mechanism's plugin
        name). Random draws (noise, keys) come from ``generator`` (a ``torch.Generator``) when given,
        so an audit repeats. None: the mechanism does not change what the server sees (the default). A privacy
        mechanism implements it with the same code its clients and server run (its noise, its
        masks), so an attack measures the mechanism as deployed; the audit refuses a privacy
        setting whose mechanism returns None."""
        return None

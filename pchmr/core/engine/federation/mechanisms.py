"""The runtime's loops over a strategy's mechanisms, as Lightning's Trainer calls its callbacks.

The server and every client process build one :class:`MechanismRuntime` from the run's
:class:`~pchmr.core.contracts.strategy.StrategyParts`; building it asks the mechanisms for their
round protocol, client handlers and client mods once and refuses mechanisms that cannot run
together (:class:`~pchmr.core.contracts.strategy.IncompatibleError` naming both):

* two round protocols (each would run the whole round);
* two handlers for one client stage;
* one train-config key from two mechanisms (and, each round, one round-metrics key).

Checkpoints hold the mechanisms' states by name (:data:`STATES_KEY`). A checkpoint of the layout
before mechanisms (:data:`LEGACY_STATE_KEY`: one state from the outermost stateful wrapper, which
nested the wrapped strategy's under ``"inner"``) is split onto today's stateful mechanisms
(:func:`legacy_states`) and resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.strategy import (
    ClientHandler,
    ClientMod,
    IncompatibleError,
    RoundProtocol,
    StrategyParts,
    UpdateInfo,
)

__all__ = ["LEGACY_INNER_KEY", "LEGACY_STATE_KEY", "STATES_KEY", "MechanismRuntime", "legacy_states"]

#: Checkpoint key of ``{mechanism name: state_dict()}``.
STATES_KEY = "mechanism_states"
#: Checkpoint key of the layout before mechanisms: the outermost wrapper's ``get_state()``.
LEGACY_STATE_KEY = "strategy_state"
#: Where that layout's wrappers nested the wrapped strategy's state.
LEGACY_INNER_KEY = "inner"


class MechanismRuntime:
    """Calls every hook of ``parts.mechanisms`` in list order and combines what they return."""

    def __init__(self, parts: StrategyParts) -> None:
        self.name = parts.name
        self.mechanisms: tuple[Mechanism, ...] = parts.mechanisms
        self.round_protocol: RoundProtocol | None = None
        owner: Mechanism | None = None
        handlers: dict[str, ClientHandler] = {}
        handler_owner: dict[str, str] = {}
        for mechanism in self.mechanisms:
            protocol = mechanism.round_protocol()
            if protocol is not None:
                if owner is not None:
                    raise IncompatibleError(
                        f"strategy '{self.name}': mechanisms '{owner.name}' and '{mechanism.name}' both run a round "
                        "protocol, and only one can run a round; drop one of them"
                    )
                owner, self.round_protocol = mechanism, protocol
            for stage, handler in mechanism.client_handlers().items():
                if stage in handlers:
                    raise IncompatibleError(
                        f"strategy '{self.name}': mechanisms '{handler_owner[stage]}' and '{mechanism.name}' both "
                        f"handle the client stage '{stage}'; a stage names one handler"
                    )
                handlers[stage], handler_owner[stage] = handler, mechanism.name
        self.protocol_owner = owner.name if owner is not None else None
        self.client_handlers: Mapping[str, ClientHandler] = handlers
        self.client_mods: tuple[ClientMod, ...] = tuple(mod for m in self.mechanisms for mod in m.client_mods())
        self.train_config()  # a clash of keys is refused before any round

    # -- both sides ------------------------------------------------------------------------
    def prepare_module(self, module: Any) -> None:
        for mechanism in self.mechanisms:
            mechanism.prepare_module(module)

    # -- server ----------------------------------------------------------------------------
    def before_round(self, server_round: int) -> None:
        """Each mechanism's ``before_round``; a PrivacyBudgetExhausted propagates at once."""
        for mechanism in self.mechanisms:
            mechanism.before_round(server_round)

    def train_config(self) -> dict[str, Any]:
        return _merged(self.name, "train-config", [(m.name, m.train_config()) for m in self.mechanisms])

    def round_metrics(self, server_round: int) -> dict[str, float | dict[str, float]]:
        """The mechanisms' metrics for ``server_round``, merged, keys as they gave them: numbers as
        floats, a mapping of names to numbers as a dict of floats."""
        parts = [(m.name, m.round_metrics(server_round)) for m in self.mechanisms]
        return {key: _metric_value(value) for key, value in _merged(self.name, "round-metrics", parts).items()}

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{mechanism name: its state_dict()}`` for the checkpoint."""
        return {m.name: dict(m.state_dict()) for m in self.mechanisms}

    def load_state_dict(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Give each mechanism its saved state; a state of a mechanism this run lacks is refused."""
        by_name = {m.name: m for m in self.mechanisms}
        unknown = sorted(set(states) - set(by_name))
        if unknown:
            raise ValueError(
                f"the checkpoint holds state of mechanism(s) {unknown}, which strategy '{self.name}' does not have "
                f"(it has: {', '.join(by_name) or 'none'}); the checkpoint was written by other plugins or versions "
                "than this run's config.json names: start a new run"
            )
        for name, state in states.items():
            try:
                by_name[name].load_state_dict(state)
            except (KeyError, TypeError) as exc:
                raise ValueError(f"mechanism '{name}' cannot restore the checkpoint's state: {exc!r}") from exc

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Load the mechanisms' states from a checkpoint of either layout."""
        if STATES_KEY in checkpoint:
            self.load_state_dict(checkpoint[STATES_KEY])
        elif checkpoint.get(LEGACY_STATE_KEY) is not None:
            self.load_state_dict(legacy_states(checkpoint[LEGACY_STATE_KEY], self.mechanisms, self.name))

    # -- client ----------------------------------------------------------------------------
    def transform_update(
        self, new_state: dict[str, Any], global_state: dict[str, Any], info: UpdateInfo
    ) -> dict[str, Any]:
        for mechanism in self.mechanisms:
            new_state = mechanism.transform_update(new_state, global_state, info)
        return new_state


def _metric_value(value: Any) -> float | dict[str, float]:
    """A round metric as rounds.jsonl holds it: a float, or names → floats (e.g. per-layer values)."""
    if isinstance(value, Mapping):
        return {str(name): float(number) for name, number in value.items()}
    return float(value)


def _merged(strategy: str, what: str, parts: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One dict of every mechanism's ``(name, values)``; a key given by two mechanisms is refused."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name, values in parts:
        for key, value in values.items():
            if key in merged:
                raise IncompatibleError(
                    f"strategy '{strategy}': mechanisms '{owner[key]}' and '{name}' both set the {what} key '{key}'; "
                    "a key must come from one mechanism"
                )
            merged[key], owner[key] = value, name
    return merged


def legacy_states(
    state: Mapping[str, Any], mechanisms: tuple[Mechanism, ...], strategy: str
) -> dict[str, Mapping[str, Any]]:
    """A ``strategy_state`` of the layout before mechanisms as ``{mechanism name: state}``.

    That layout saved the outermost stateful wrapper's state, with the state of the strategy it
    wrapped under ``"inner"`` (None when it had none), recursively. Today's stateful mechanisms
    (those whose fresh ``state_dict()`` is not empty) take the levels from the last one (the
    outermost wrapper) inwards: a level with ``"inner"`` gives its other entries to the mechanism
    and passes ``"inner"`` on; a level without it is the innermost mechanism's whole state.
    """
    stateful = [m for m in mechanisms if m.state_dict()]
    out: dict[str, Mapping[str, Any]] = {}
    current: Any = state
    for mechanism in reversed(stateful):
        if current is None:
            break
        if not isinstance(current, Mapping):
            raise ValueError(
                f"the checkpoint's strategy_state (the layout before mechanisms) holds a {type(current).__name__} "
                f"where mechanism '{mechanism.name}' expects a mapping; start a new run"
            )
        if LEGACY_INNER_KEY in current:
            out[mechanism.name] = {k: v for k, v in current.items() if k != LEGACY_INNER_KEY}
            current = current[LEGACY_INNER_KEY]
        else:
            out[mechanism.name], current = current, None
    if current is not None:
        holders = ", ".join(m.name for m in stateful) or "none"
        raise ValueError(
            f"the checkpoint's strategy_state (the layout before mechanisms) holds more state than strategy "
            f"'{strategy}''s stateful mechanisms ({holders}) can take; the checkpoint was written by other plugins "
            "or versions than this run's config.json names: start a new run"
        )
    return out

"""Helpers shared by the CLI commands."""

from __future__ import annotations

from typing import Any

__all__ = ["coerce_value"]


def coerce_value(value: str) -> Any:
    """A ``key=value`` option's value: ``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"``/``"false"`` →
    bool, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value

"""Helpers shared by the CLI commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["coerce_value", "parse_options"]


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


def parse_options(items: list[str], flag: str, fail: Callable[[str], BaseException]) -> dict[str, Any]:
    """Repeated ``key=value`` flags → dict (values through :func:`coerce_value`); a malformed
    item raises ``fail(message)``, the calling command's own error exit."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise fail(f"{flag} expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = coerce_value(value.strip())
    return out

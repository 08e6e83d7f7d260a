"""Helpers shared by the CLI commands."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["check_number", "coerce_value", "parse_options"]


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
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            missing = "no '='" if not equals else "no key before '='"
            raise fail(f"{flag} expects key=value (e.g. {flag} name=3), got '{item}' ({missing})")
        out[key.strip()] = coerce_value(value.strip())
    return out


def check_number(
    flag: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    whole: bool = False,
) -> str | None:
    """None when ``value`` lies in the range, else the refusal, in RunConfig's wording:
    ``--epochs must be a whole number >= 1, got 0``, ``--sample-rate must lie in (0, 1], got 0.0``."""
    inside = math.isfinite(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if inside:
        return None
    if low is not None and high is not None:
        rule = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        kind = "a whole number" if whole else "a finite number"
        bound = (f" {'>' if low_open else '>='} {low:g}" if low is not None
                 else f" {'<' if high_open else '<='} {high:g}" if high is not None else "")  # fmt: skip
        rule = f"be {kind}{bound}"
    return f"{flag} must {rule}, got {value!r}"

"""Errors plugins raise (and the engine reports): each names what was wrong and what was expected.

The engine turns them into one-line messages with exit code 2 (bad input) before any heavy
work where it can; the module that owns a contract defines its own error beside it and this
module gathers those that several contracts share.
"""

from __future__ import annotations

__all__ = ["DatasetFormatError", "OptionError"]


class OptionError(ValueError):
    """A plugin option has an unknown key or a value outside what the plugin declares; the
    message names the plugin, the option, the value and what is allowed."""


class DatasetFormatError(ValueError):
    """A dataset file is not in the format its loader reads; the message names the file, the key
    and what was expected."""

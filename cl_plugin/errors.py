"""Exceptions raised by cl-plugin.

Every error subclasses :class:`ClPluginError` and, where the cause is a bad
value, :class:`ValueError`, so ``except ValueError`` keeps working. No
Lightning import here: the algorithms must stay usable without it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ClPluginError",
    "ConfigError",
    "StateDictMismatchError",
    "DtypeMismatchError",
    "NonFiniteError",
    "DivergedError",
    "NoMatchingModulesError",
    "CheckpointError",
    "did_you_mean",
    "preview",
]


class ClPluginError(Exception):
    """Base class of every error that cl-plugin raises on purpose."""


class ConfigError(ClPluginError, ValueError):
    """An argument is of the wrong type, out of range, or not a known choice."""


class StateDictMismatchError(ClPluginError, ValueError):
    """Two collections of tensors disagree in their names or shapes."""


class DtypeMismatchError(StateDictMismatchError):
    """Two tensors that must share a dtype do not."""


class NonFiniteError(ClPluginError, ValueError):
    """A tensor holds NaN or infinity."""


class DivergedError(NonFiniteError):
    """The trained weights hold NaN or infinity, or moved too far from θ₀ to subtract: there is no task vector."""


class NoMatchingModulesError(ClPluginError, ValueError):
    """A name pattern matched no module or tensor."""


class CheckpointError(ClPluginError, ValueError):
    """A saved state cannot be resumed: it is corrupt, of an unknown format
    version, inconsistent with itself, or does not fit the model it is loaded into.

    A state that is sound but was written with other options than the object
    loading it raises :class:`ConfigError` instead, naming each difference.
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def preview(names: Iterable[str], limit: int = 5) -> str:
    """Format the first ``limit`` names, and how many more there are."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown

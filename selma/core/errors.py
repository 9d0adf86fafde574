"""The one error every bad-input exception of selma derives from.

``selma ...`` prints an :class:`InputError` as ``selma: <message>`` and exits 2; its message starts
with the field, file or path at fault. Any other exception is a runtime failure (exit 1).
"""

from __future__ import annotations


class InputError(ValueError):
    """Input the user can fix: a config field, a file, a run directory, a command-line argument."""


class ConfigError(InputError):
    """A config that cannot be used; the message names the offending field."""

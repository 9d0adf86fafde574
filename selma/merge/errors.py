"""The merge's error, below :mod:`selma.merge.methods` and :mod:`selma.merge.fuse` so that both can raise it."""

from __future__ import annotations

from selma.core.errors import InputError


class MergeError(InputError):
    """Experts or options that cannot be merged; the message names the experts involved."""

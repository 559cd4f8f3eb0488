"""The errors checkpoint readers and writers raise: a bad file, or a destination that cannot be written."""

from __future__ import annotations

__all__ = ["CheckpointError", "DestinationError", "DestinationLockedError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model."""


class DestinationError(OSError):
    """A checkpoint cannot be written where asked: the destination (or its parent) is not writable."""


class DestinationLockedError(DestinationError):
    """Another process is writing the same destination (see :func:`nezha_zoo.io.lock.destination_lock`)."""

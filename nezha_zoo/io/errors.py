"""The error every checkpoint reader and writer raises for a bad file."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model."""

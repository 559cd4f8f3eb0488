"""Checkpoint tools: inspect, convert and verify (no framework imported at module level)."""

from nezha_zoo.conversion.inspect import detect_head, inspect_checkpoint

__all__ = ["detect_head", "inspect_checkpoint"]

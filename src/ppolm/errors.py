"""Exceptions raised for bad input. Every message names the offending value and what to do."""

from __future__ import annotations


class PPOLMError(Exception):
    """Base class of every error ppolm raises on purpose."""


class ConfigError(PPOLMError, ValueError):
    """A configuration value is out of range, inconsistent, unknown or of the wrong type."""


class DataError(PPOLMError, ValueError):
    """Prompts, tokenizer or model inputs are unusable (empty, too long, mismatched)."""


class RewardError(PPOLMError, ValueError):
    """A reward function raised, or returned something that is not one finite float per response."""


class CheckpointError(PPOLMError):
    """A checkpoint or model file is missing, corrupt or does not fit the run."""


class TrainingError(PPOLMError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite updates in a row)."""

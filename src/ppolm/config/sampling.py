"""The sampling settings of a run, declared and checked in one place.

Six settings say how responses are sampled, and each has one owner:

* ``PPOConfig`` holds the two that training computes with: ``temperature`` (every logprob,
  the policy's and the reference's, is taken at it, so the first PPO ratio is exactly 1) and
  ``samples_per_prompt`` (the group estimators compare a prompt's k responses, and
  ``batch_size`` counts them);
* the environment holds the four that only shape a response: ``max_new_tokens``, ``top_k``,
  ``top_p`` and ``stop_token_ids`` (``TextGenerationEnv(..., max_new_tokens=16)``).

A run's YAML gives all six in one ``sampling:`` section (``SamplingConfig``), which
``ppolm.run.build_run`` hands to their owners. Whichever object holds a value,
``check_sampling`` checks it, with the same words.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ppolm.errors import ConfigError, DataError, PPOLMError

#: The sampling settings the environment holds (the rest are PPOConfig's).
ENV_SAMPLING = ("max_new_tokens", "top_k", "top_p", "stop_token_ids")
#: The sampling settings PPOConfig holds.
PPO_SAMPLING = ("temperature", "samples_per_prompt")


@dataclass
class SamplingConfig:
    """How responses are sampled: the ``sampling:`` section of a run's YAML. ``ppo_values()``
    go to the PPOConfig, ``env_values()`` to the environment."""

    max_new_tokens: int = 16
    """Longest response, in tokens (the environment's)."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 keeps every token (the environment's)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1.0 keeps
    every token (the environment's)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """More ids that end a response besides the tokenizer's EOS and the model's generation
    config's (the environment's)."""
    temperature: float = 1.0
    """Logits are divided by it for sampling AND for every logprob computed for training and
    for the reference, so the first ratio is exactly 1 (PPOConfig's)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (a group); ``batch_size`` counts episodes and must be a
    multiple of it (PPOConfig's)."""

    def __post_init__(self) -> None:
        values = check_sampling(dataclasses.asdict(self), where="sampling.")
        self.stop_token_ids = values["stop_token_ids"]

    def env_values(self) -> dict[str, Any]:
        """The settings the environment takes (``TextGenerationEnv`` keyword arguments)."""
        return {name: getattr(self, name) for name in ENV_SAMPLING}

    def ppo_values(self) -> dict[str, Any]:
        """The settings PPOConfig takes."""
        return {name: getattr(self, name) for name in PPO_SAMPLING}


def check_sampling(values: dict[str, Any], where: str = "",
                   error: type[PPOLMError] = ConfigError) -> dict[str, Any]:
    """Check the sampling settings in ``values`` (any of the six; the others are left alone)
    and return them, ``stop_token_ids`` as a list of ints (None: []). ``where`` prefixes the
    names in messages (``sampling.``); ``error`` is the exception raised (the environment
    raises ``DataError`` for what it is given)."""
    out = dict(values)

    def integer(name: str, low: int, rule: str) -> None:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise error(f"{where}{name}={v!r} must be an int {rule}.")

    def real(name: str) -> float:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise error(f"{where}{name}={v!r} must be a number.")
        return float(v)

    if "max_new_tokens" in values:
        integer("max_new_tokens", 1, "> 0")
    if "top_k" in values:
        integer("top_k", 0, ">= 0 (0: no top-k filter)")
    if "top_p" in values and not 0 < real("top_p") <= 1:
        raise error(f"{where}top_p={values['top_p']!r} must be in (0, 1] (1.0: no filter).")
    if "temperature" in values and not real("temperature") > 0:
        raise error(f"{where}temperature={values['temperature']!r} must be > 0.")
    if "samples_per_prompt" in values:
        integer("samples_per_prompt", 1, ">= 1")
    if "stop_token_ids" in values:
        out["stop_token_ids"] = _stop_token_ids(values["stop_token_ids"], where, error)
    return out


def _stop_token_ids(ids: Any, where: str, error: type[PPOLMError]) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise error(f"{where}stop_token_ids={ids!r} must be a list of token ids (ints >= 0), "
                    "or None.")
    ids = list(ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0]
    if bad:
        raise error(f"{where}stop_token_ids={ids!r}: {bad!r} are not token ids; every stop "
                    "token id must be an int >= 0.")
    return [int(t) for t in ids]


def check_missing_eos_penalty(value: Any, where: str = "",
                              error: type[PPOLMError] = ConfigError) -> float | None:
    """``missing_eos_penalty`` as a float (None: no penalty), or ``error``: it is subtracted
    from the score of a response cut at ``max_new_tokens``, so it must be >= 0."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < 0):
        raise error(f"{where}missing_eos_penalty={value!r} is SUBTRACTED from the score of a "
                    "response that never ends (as in TRL): give a positive number (e.g. 1.0), "
                    "or None (null) for no penalty.")
    return float(value)


def check_overlong(buffer: Any, factor: Any, budget: int, where: str = "",
                   error: type[PPOLMError] = DataError) -> tuple[int, float] | None:
    """``overlong_buffer`` and ``overlong_penalty`` (DAPO's soft overlong punishment) as
    ``(buffer, factor)``, None when the buffer is None, or ``error``: the buffer is a number of
    tokens within the response budget ``budget``, the penalty a size >= 0."""
    if buffer is None:
        return None
    if (isinstance(buffer, bool) or not isinstance(buffer, numbers.Integral)
            or not 0 < int(buffer) <= budget):
        raise error(f"{where}overlong_buffer={buffer!r} must be a number of tokens between 1 and "
                    f"the response budget ({budget}: max_new_tokens, or the model's tokens of a "
                    "multi-turn episode), or None (null) for no overlong term.")
    if (isinstance(factor, bool) or not isinstance(factor, numbers.Real)
            or not math.isfinite(factor) or factor < 0):
        raise error(f"{where}overlong_penalty={factor!r} must be a number >= 0 (the term's size "
                    "at the budget, e.g. 1.0).")
    return int(buffer), float(factor)

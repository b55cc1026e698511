"""Typed batches passed between the phases of a PPO iteration.

Shapes: B episodes, P prompt tokens (left-padded), T response tokens (right-padded after EOS),
L = P + T. Every mask is 1 on real tokens and 0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class TurnInfo:
    """Multi-turn episodes (``TextGenerationEnv(..., interaction=...)``): what happened in
    each, for the reward and for logging. Their ``Episodes`` hold the whole transcript after
    the prompt as the "response": ``response_mask`` is 1 on the model's tokens only, the
    replies are context (1 in ``attention_mask``)."""

    turns: list[list[str]]         # B lists: the model's turns as text
    replies: list[list[str]]       # B lists: the interaction's replies (as given)
    states: list[dict[str, Any]]   # B dicts: the interaction's state of each episode
    num_turns: Tensor              # (B,) long: model turns
    truncated: Tensor              # (B,) bool: stopped by max_turns or max_episode_tokens
    tool_errors: Tensor            # (B,) long: failed tool calls
    reply_roles: list[list[str]] = field(default_factory=list)  # B lists: each reply's role


@dataclass(frozen=True)
class Episodes:
    """What the environment returns: sampled responses and their scores."""

    prompts: list[str]             # B prompt strings
    responses: list[str]           # B decoded responses (up to, not including, EOS)
    input_ids: Tensor              # (B, L) prompt then response tokens
    attention_mask: Tensor         # (B, L) 1 on real prompt and response tokens
    response_mask: Tensor          # (B, T) 1 on response tokens up to and including EOS (in
                                   # multi-turn episodes: on the model's tokens only)
    scores: Tensor                 # (B,) reward of each response (penalties and turn rewards
                                   # included)
    ended: Tensor                  # (B,) bool: the response emitted EOS
    reward_parts: dict[str, float]  # mean of each named part of a combined reward
    reward_seconds: float          # time spent in the reward function
    token_scores: Tensor | None = None  # (B, T) the scores' increments token by token (prefix
                                        # shaping; each row adds up to the score), or None
    logprobs: Tensor | None = None  # (B, T) log pi(token) from the sampling pass (record=True)
    hidden: Tensor | None = None    # (B, T, H) the sampler's trunk states that predicted them
    turn_info: TurnInfo | None = None  # multi-turn episodes: turns, replies, flags (else None)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]


@dataclass(frozen=True)
class Rollout:
    """One iteration's experience: what was sampled and what the models said of it."""

    input_ids: Tensor       # (B, L)
    attention_mask: Tensor  # (B, L)
    response_mask: Tensor   # (B, T) float
    logprobs: Tensor        # (B, T) log pi_old(a_t | s_t) at the sampling temperature
    ref_logprobs: Tensor    # (B, T) log pi_ref(a_t | s_t) at the sampling temperature
    values: Tensor          # (B, T) V_old(s_t)
    scores: Tensor          # (B,) reward-function scores
    index: Tensor           # (B,) long: each episode's place in the iteration's batch
    ref_dist: Tensor | None = None  # (B, T, V) log pi_ref(. | s_t), for kl_estimator='full'
    token_scores: Tensor | None = None  # (B, T) per-token score increments (prefix shaping)
    sampler_logprobs: Tensor | None = None  # (B, T) the sampler's log pi_rollout(a_t), beside
                                            # the trainer's ``logprobs`` (tis_cap)

    def select(self, idx: Tensor) -> Rollout:
        """The episodes at ``idx`` (a 1-D index tensor), as a smaller Rollout."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device: torch.device) -> Rollout:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


@dataclass(frozen=True)
class Advantages:
    """What the advantage estimation makes of a Rollout (row for row)."""

    rewards: Tensor         # (B, T) per-token rewards (score at the last token, KL penalty)
    advantages: Tensor      # (B, T)
    returns: Tensor         # (B, T) advantages + values: the value targets

    def select(self, idx: Tensor) -> Advantages:
        """The rows at ``idx`` (a 1-D index tensor)."""
        return Advantages(self.rewards[idx], self.advantages[idx], self.returns[idx])

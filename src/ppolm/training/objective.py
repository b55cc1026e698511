"""What the update optimises: the advantages of a rollout (by the configured estimator) and the
loss of a micro-batch. Pure functions of the config, the batches and the forward pass."""

from __future__ import annotations

from torch import Tensor

from ppolm.config.ppo import PPOConfig
from ppolm.engines.base import ResponseForward
from ppolm.maths.advantages import compute_gae, masked_mean, whiten
from ppolm.maths.aggregation import aggregate_loss
from ppolm.maths.estimators import (
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from ppolm.maths.losses import full_kl, kl_penalty, policy_loss, truncated_is_weights, value_loss
from ppolm.maths.rewards import token_rewards
from ppolm.rollout.types import Advantages, Rollout

#: Statistics of a minibatch that are its maximum over micro-batches and ranks, not a mean.
MAXED_STATS = ("ratio_max_dev", "log_ratio_abs_max")
#: Those read on the update's first forward only: before any step, the new logprobs differ
#: from the rollout's by numerics alone (the sampler's against the trainer's computation).
FIRST_FORWARD_STATS = ("log_ratio_abs", "log_ratio_abs_max")


def first_forward_stats(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor
                        ) -> dict[str, Tensor]:
    """Mean and max |log pi - log pi_old| over the valid tokens (``FIRST_FORWARD_STATS``).
    Shapes: (B, T) x 3 -> scalars."""
    diff = (logprobs.detach() - old_logprobs).abs() * mask
    return {"log_ratio_abs": masked_mean(diff, mask), "log_ratio_abs_max": diff.max()}


def estimate_advantages(cfg: PPOConfig, rollout: Rollout, kl_coef: float) -> Advantages:
    """Per-token rewards (``token_rewards``: the score, or its increments with prefix shaping;
    -kl_coef * KL on every token when the KL is in the reward), then the advantages of
    ``cfg.advantage_estimator``: GAE and whitening, or a critic-free estimator
    (``ppolm.maths.estimators``; their returns are not value targets: no value head is
    trained). Shapes: rollout (B, T) -> Advantages of (B, T)."""
    mask, k = rollout.response_mask, cfg.samples_per_prompt
    in_reward = cfg.kl_mode == "reward"
    rewards = token_rewards(rollout.scores, mask, token_scores=rollout.token_scores,
                            logprobs=rollout.logprobs if in_reward else None,
                            ref_logprobs=rollout.ref_logprobs if in_reward else None,
                            kl_coef=kl_coef, kl_estimator=cfg.kl_estimator,
                            whiten_rewards=cfg.whiten_rewards)
    est = cfg.advantage_estimator
    if est == "gae":
        advantages, returns = compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        return Advantages(rewards, advantages, returns)
    if est == "reinforce_pp":
        advantages, returns = reinforce_pp_advantages(rewards, mask)
    elif est == "reinforce_pp_baseline":
        advantages, returns = reinforce_pp_baseline_advantages(rewards, rollout.scores, mask, k)
    else:
        group = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages,
                 "rloo": rloo_advantages}[est]
        advantages = group(rollout.scores, mask, k)
        returns = advantages
    return Advantages(rewards, advantages, returns)


def ppo_loss(cfg: PPOConfig, fwd: ResponseForward, values: Tensor | None, micro: Rollout,
             adv: Advantages, num_tokens: Tensor, num_seqs: int, max_len: int, kl_coef: float
             ) -> tuple[Tensor, dict[str, float]]:
    """The loss of one micro-batch: the clipped surrogate (aggregated as
    ``cfg.aggregation`` says) + vf_coef * the clipped value loss (with a value head)
    - ent_coef * entropy (+ kl_coef * KL when the KL is in the loss). Normalisers are those of
    the whole minibatch (``num_tokens`` tokens, ``num_seqs`` sequences; ``max_len`` for
    seq-mean-token-sum-norm), so micro-batch losses add up to the minibatch's.
    Returns the loss and its statistics as shares of the minibatch's (the caller adds them)."""
    mask = micro.response_mask

    def aggregate(per_token: Tensor) -> Tensor:
        return aggregate_loss(per_token, mask, cfg.aggregation, num_tokens=num_tokens,
                              num_seqs=num_seqs, max_len=max_len)

    weights = None
    if cfg.tis_cap is not None:
        assert micro.sampler_logprobs is not None      # the rollout keeps them with tis_cap
        weights = truncated_is_weights(micro.logprobs, micro.sampler_logprobs, mask, cfg.tis_cap)
    pg, pg_stats = policy_loss(fwd.logprobs, micro.logprobs, adv.advantages, mask,
                               cfg.clip_low, num_tokens, aggregate=aggregate,
                               clip_range_high=cfg.clip_high, ratio_level=cfg.ratio_level,
                               weights=weights)
    pg_stats.update(first_forward_stats(fwd.logprobs, micro.logprobs, mask))
    ent = aggregate(fwd.entropy)
    loss = pg - cfg.ent_coef * ent
    stats = {"policy_loss": pg, "entropy": ent}
    if values is not None:
        vf, vf_stats = value_loss(values, micro.values, adv.returns, mask,
                                  cfg.clip_range_value, num_tokens)
        loss = loss + cfg.vf_coef * vf
        stats["value_loss"] = vf
        pg_stats = {**pg_stats, **vf_stats}
    if cfg.kl_mode == "loss":
        loss = loss + kl_coef * aggregate(loss_kl(cfg, fwd, micro))
    # The shares of a mean over the minibatch: the caller adds them up.
    scale = float(num_tokens / mask.sum().clamp(min=1))
    out = {"loss": float(loss.detach()) * scale,
           **{k: float(v.detach()) * scale for k, v in stats.items()},
           **{k: float(v) for k, v in pg_stats.items()}}
    return loss, out


def loss_kl(cfg: PPOConfig, fwd: ResponseForward, micro: Rollout) -> Tensor:
    """The per-token KL to the reference the loss carries: the exact KL over the vocabulary
    (kl_estimator='full'), or k1/k2/k3 on the sampled tokens. Shapes: -> (b, T)."""
    if cfg.kl_estimator == "full":
        assert fwd.dist is not None and micro.ref_dist is not None
        return full_kl(fwd.dist, micro.ref_dist)
    return kl_penalty(fwd.logprobs, micro.ref_logprobs, cfg.kl_estimator)


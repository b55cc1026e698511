"""An iteration's batch of episodes: the next prompt groups, sampled once, or with DAPO's
dynamic sampling (Yu et al. 2025) as many rounds as it takes to fill the batch with groups
that carry a signal.

A group whose rewards are all equal has advantages exactly 0 under the grouped estimators: it
adds tokens to the normalisers and nothing to the gradient, so the batch's effective size
shrinks as the task is learned (or while it is too hard). Dynamic sampling drops such groups
and samples further prompt groups in their place. Under torchrun every rank fills its own share
of the batch; the ranks sample the same number of rounds (each round's size is the largest
shortfall of any rank), so every rank walks the same prompt order and the batch is full
globally.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ppolm.config.ppo import PPOConfig
from ppolm.maths.estimators import zero_signal_groups
from ppolm.parallel.world import World
from ppolm.policies.base import Policy
from ppolm.rollout.batches import concat_episodes, select_episodes
from ppolm.rollout.env import TextGenerationEnv
from ppolm.rollout.types import Episodes


class BatchSampler:
    """Samples a rank's share of an iteration's batch from ``env`` with ``generator``.
    ``stats``: the last batch's dynamic-sampling figures (empty without it)."""

    def __init__(self, config: PPOConfig, env: TextGenerationEnv, world: World,
                 device: torch.device, generator: torch.Generator) -> None:
        self.config, self.env, self.world = config, env, world
        self.device, self.generator = device, generator
        self.stats: dict[str, float] = {}

    def sample(self, policy: Policy, record: bool, trunk: Any = None) -> Episodes:
        """This rank's episodes of the next batch (``record``: with the sampler's logprobs and
        states; ``trunk``: the decoding steps' trunk, see ``TextGenerationEnv.sample``)."""
        cfg = self.config
        if not cfg.dynamic_sampling:
            return self.draw(policy, cfg.batch_size // cfg.samples_per_prompt, record, trunk)
        return self.fill(policy, record, trunk)

    def draw(self, policy: Policy, groups: int, record: bool, trunk: Any) -> Episodes:
        """One round: the next ``groups`` prompt groups of the run (every rank's), of which
        this rank samples its contiguous share (every rank walks the same prompt order)."""
        cfg, world, k = self.config, self.world, self.config.samples_per_prompt
        indices, share = None, None
        if world.distributed:
            mine = world.share(self.env.next_indices(groups))
            indices = [i for i in mine for _ in range(k)]
            # this rank's episodes' place in the round (an interaction's generators)
            share = (world.rank * len(indices), groups * k)
        return self.env.sample(policy, groups * k, cfg.temperature, self.device,
                               self.generator, indices=indices, record=record, trunk=trunk,
                               samples_per_prompt=k, share=share)

    def fill(self, policy: Policy, record: bool, trunk: Any) -> Episodes:
        """Dynamic sampling: rounds of ``draw`` keeping the groups with a signal until this
        rank's share is full, at most ``max_sampling_rounds``; then the share is completed with
        dropped groups, with a warning. The kept groups in the order sampled, the surplus of
        the last round left out."""
        cfg, world, k = self.config, self.world, self.config.samples_per_prompt
        need = cfg.batch_size // k // world.size            # this rank's groups
        kept: list[Episodes] = []
        spare: list[Episodes] = []
        have = rounds = sampled = dropped = 0
        score_sum = 0.0
        while True:
            short = int(world.reduce_stats({"short": float(need - have)},
                                           maxed=("short",))["short"])
            if short <= 0 or rounds == cfg.max_sampling_rounds:
                break
            episodes = self.draw(policy, short * world.size, record, trunk)
            rounds += 1
            sampled += len(episodes.prompts)
            score_sum += float(episodes.scores.sum())
            empty = zero_signal_groups(episodes.scores, k).tolist()         # (G,)
            signal = [g for g, e in enumerate(empty) if not e]
            kept.append(select_episodes(episodes, _rows(signal, k)))
            spare.append(select_episodes(episodes, _rows([g for g, e in enumerate(empty) if e],
                                                         k)))
            have += len(signal)
            dropped += len(empty) - len(signal)
        batch = concat_episodes([e for e in kept if e.prompts] or kept[:1])
        if have < need:
            warnings.warn(f"dynamic sampling: {have} of {need} prompt groups had a signal after "
                          f"max_sampling_rounds={cfg.max_sampling_rounds} rounds; the batch is "
                          "completed with groups whose rewards are all equal (they add no "
                          "gradient). Raise max_sampling_rounds, or see whether the task is too "
                          "hard or already solved.", stacklevel=2)
            batch = concat_episodes([batch, *spare])
        batch = select_episodes(batch, list(range(need * k)))
        totals = world.reduce_stats({"sampled": float(sampled), "dropped": float(dropped),
                                     "score_sum": score_sum})
        # score_mean is the trained batch's, which leaves out the groups that all scored
        # alike (solved ones too): the policy's own mean score is over every episode sampled
        self.stats = {"sampling_rounds": float(rounds), "groups_dropped": totals["dropped"],
                      "sampled_per_trained": totals["sampled"] / cfg.batch_size,
                      "sampled_score_mean": totals["score_sum"] / totals["sampled"]}
        return batch


def _rows(groups: list[int], k: int) -> list[int]:
    """The episodes of prompt groups ``groups`` (k side by side each)."""
    return [g * k + j for g in groups for j in range(k)]

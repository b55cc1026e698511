"""Credit assignment across turns, as pure tensor functions: GAE walks the model's tokens only
(a turn's last token bootstraps from the value at the next turn's first model token), turn
rewards and the final score sit on their turns' last model tokens, the KL penalty on every
model token, and the critic-free estimators spread the episode's total reward over the model's
tokens. Checked against a hand-written loop on 3-turn episodes with replies of different
lengths and a ragged batch."""

from __future__ import annotations

import torch

from ppolm.maths.advantages import compute_gae
from ppolm.maths.estimators import grpo_advantages
from ppolm.maths.rewards import token_rewards, turn_token_scores

# 1 = a model token, 0 = a reply token (context) or padding after the episode.
MASKS = [
    [1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0],      # turns of 2, 1, 2 tokens; replies of 2 and 3
    [1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0],      # 1, 3, 1; replies of 1 and 4
    [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0],      # two turns only, then padding
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],      # one turn
]


def loop_gae(rewards, values, mask, gamma, lam):
    """GAE the slow way: list each episode's model tokens, then the textbook recursion over
    that list alone (V = 0 after the last)."""
    adv = torch.zeros_like(values)
    for b in range(len(mask)):
        steps = [t for t in range(len(mask[b])) if mask[b][t]]
        next_v = next_a = 0.0
        for t in reversed(steps):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            next_a = delta + gamma * lam * next_a
            next_v = float(values[b, t])
            adv[b, t] = next_a
    return adv


def test_gae_over_the_model_tokens_of_several_turns():
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor(MASKS, dtype=torch.float64)
    values = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    rewards = torch.randn(mask.shape, generator=gen, dtype=torch.float64) * mask
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = compute_gae(rewards, values, mask, gamma, lam)
        want = loop_gae(rewards, values, MASKS, gamma, lam)
        assert torch.allclose(adv, want, atol=1e-12)
        assert torch.allclose(ret, (want + values) * mask, atol=1e-12)
    # Values and rewards on reply tokens are never read: changing them changes nothing.
    noise = torch.randn(mask.shape, generator=gen, dtype=torch.float64) * (1 - mask)
    again, _ = compute_gae(rewards + noise, values + noise, mask, 1.0, 0.95)
    assert torch.equal(again, compute_gae(rewards, values, mask, 1.0, 0.95)[0])


def test_a_turns_last_token_bootstraps_from_the_next_turns_first_model_token():
    mask = torch.tensor([MASKS[0]], dtype=torch.float64)
    values = torch.arange(12, dtype=torch.float64)[None] / 10
    rewards = torch.zeros_like(values)
    rewards[0, 1] = 0.5                                 # turn 1's reward, on its last token
    adv, _ = compute_gae(rewards, values, mask, gamma=1.0, lam=0.0)      # one-step TD errors
    # token 1 (last of turn 1) -> token 4 (first of turn 2): delta = 0.5 + V4 - V1
    assert adv[0, 1].item() == torch.tensor(0.5 + 0.4 - 0.1, dtype=torch.float64).item()
    assert adv[0, 4].item() == torch.tensor(0.8 - 0.4, dtype=torch.float64).item()
    assert adv[0, 9].item() == -0.9                     # the last model token: V = 0 after it


def test_rewards_of_turns_and_the_kl_on_model_tokens_only():
    mask = torch.tensor(MASKS, dtype=torch.float64)
    turn = torch.zeros_like(mask)
    turn[0, 1], turn[0, 4], turn[1, 0] = 0.5, -0.25, 1.0    # each on its turn's last token
    final = torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=torch.float64)
    per_token = turn_token_scores(final, turn, mask)
    assert torch.allclose(per_token.sum(1), final + turn.sum(1))
    assert per_token[0, 9] == 1.0 and per_token[1, 9] == 0.0 and per_token[2, 8] == 2.0
    assert per_token[3, 3] == -1.0
    gen = torch.Generator().manual_seed(1)
    logprobs = -torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    ref = -torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    rewards = token_rewards(final + turn.sum(1), mask, token_scores=per_token,
                            logprobs=logprobs, ref_logprobs=ref, kl_coef=0.1)
    want = (per_token - 0.1 * (logprobs - ref)) * mask
    assert torch.allclose(rewards, want)
    assert (rewards[mask == 0] == 0).all()              # nothing on reply tokens


def test_critic_free_advantages_use_the_total_reward_on_model_tokens():
    mask = torch.tensor(MASKS, dtype=torch.float64)
    totals = torch.tensor([1.5, 0.0, 2.0, 0.5], dtype=torch.float64)  # final + turn rewards
    adv = grpo_advantages(totals, mask, group_size=4)
    z = (totals - totals.mean()) / (totals.std() + 1e-6)
    assert torch.allclose(adv, z[:, None] * mask)


def test_the_worked_example_of_the_docs():
    # docs/multi-turn.md, "Credit assignment": turns of 2, 1 and 2 model tokens, replies of 2
    # and 3 tokens, a turn reward of 0.5 after turn 1, the score 1.0 at the end; gamma 1,
    # lambda 0.5, no KL.
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0, 1, 1]], dtype=torch.float64)
    values, rewards = torch.zeros_like(mask), torch.zeros_like(mask)
    values[0, [0, 1, 4, 8, 9]] = torch.tensor([0.2, 0.4, 0.6, 0.7, 0.9], dtype=torch.float64)
    rewards[0, 1], rewards[0, 9] = 0.5, 1.0
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    model = mask.bool()
    assert torch.allclose(adv[model], torch.tensor(
        [0.60625, 0.8125, 0.225, 0.25, 0.1], dtype=torch.float64))
    assert torch.allclose(ret[model], torch.tensor(
        [0.80625, 1.2125, 0.825, 0.95, 1.0], dtype=torch.float64))

"""The per-token reward assembly as a pure function, against hand-computed values."""

from __future__ import annotations

import torch

from ppolm.maths.rewards import token_rewards, whiten_scores

# Two rows: 3 response tokens then padding, and 4 tokens.
MASK = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
SCORES = torch.tensor([1.0, -2.0])


def test_the_score_sits_on_the_last_response_token():
    expect = torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, -2]])
    assert torch.equal(token_rewards(SCORES, MASK), expect)


def test_the_kl_penalty_lands_on_every_response_token():
    logprobs = torch.tensor([[-1.0, -2, -0.5, 0], [-1, -1, -1, -1]])
    ref = torch.tensor([[-1.5, -2, -1.5, 0], [-1, -2, -1, -0.5]])
    out = token_rewards(SCORES, MASK, logprobs=logprobs, ref_logprobs=ref, kl_coef=0.1)
    k1 = (logprobs - ref) * MASK                  # [[0.5, 0, 1, 0], [0, 1, 0, -0.5]]
    expect = -0.1 * k1
    expect[0, 2] += 1.0
    expect[1, 3] += -2.0
    assert torch.allclose(out, expect)
    k3 = token_rewards(SCORES, MASK, logprobs=logprobs, ref_logprobs=ref, kl_coef=0.1,
                       kl_estimator="k3")
    r = torch.exp(ref - logprobs)
    assert torch.allclose(k3[0, :2], -0.1 * ((r - 1) - torch.log(r))[0, :2])


def test_whitened_scores_keep_their_mean_and_increments_still_add_up():
    scores = torch.tensor([1.0, 3.0, 2.0])
    mask = torch.ones(3, 2)
    increments = torch.tensor([[0.5, 0.5], [1.0, 2.0], [2.0, 0.0]])
    whitened, tokens = whiten_scores(scores, increments, mask)
    std = scores.std()
    assert torch.allclose(whitened, (scores - 2.0) / torch.sqrt(std ** 2 + 1e-8) + 2.0)
    assert tokens is not None
    assert torch.allclose(tokens.sum(1), whitened)
    assert torch.allclose(tokens[:, 0], increments[:, 0] / torch.sqrt(std ** 2 + 1e-8))
    out = token_rewards(scores, mask, token_scores=increments, whiten_rewards=True)
    assert torch.allclose(out, tokens)


def test_prefix_shaping_increments_replace_the_last_token_score():
    increments = torch.tensor([[0.2, 0.3, 0.5, 0.0], [-1.0, -1.0, 0.5, -0.5]])
    out = token_rewards(SCORES, MASK, token_scores=increments)
    assert torch.equal(out, increments * MASK)

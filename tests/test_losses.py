"""The PPO losses and KL estimators on hand-computed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from ppolm import entropy, kl_penalty, policy_loss, value_loss
from ppolm.maths.losses import full_kl


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    adv = torch.tensor([[1.0, -2.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(lp, lp.clone(), adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5)                 # -(1 - 2) / 2
    assert stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_max_dev"].item() == 0.0


def test_policy_loss_clips_in_the_right_direction():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))   # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)
    # per token max(-A r, -A clip(r)): A>0,r=1.5 -> -1.2 ; A<0,r=1.5 -> 1.5 ;
    #                                   A>0,r=0.5 -> -0.5 ; A<0,r=0.5 -> 0.8
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # gradient flows only through the unclipped tokens 2 and 3 (index 1, 2)
    new = new.clone().requires_grad_(True)
    policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)[0].backward()
    assert (new.grad[0, [0, 3]] == 0).all() and (new.grad[0, [1, 2]] != 0).all()


def test_policy_loss_token_normaliser():
    lp = torch.zeros(2, 2)
    adv = torch.ones(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = policy_loss(lp, lp, adv, mask, num_tokens=6.0)
    assert loss.item() == pytest.approx(-3.0 / 6.0)


def test_value_loss_clipped_and_unclipped():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, -0.1]])
    ret = torch.tensor([[2.0, 1.0]])
    m = torch.ones(1, 2)
    plain, _ = value_loss(new, old, ret, m, clip_range_value=None)
    assert plain.item() == pytest.approx(0.5 * ((1.0 ** 2) + 1.1 ** 2) / 2)
    clipped, stats = value_loss(new, old, ret, m, clip_range_value=0.2)
    # token 0: V_clip = 0.2 -> (1.8)^2 > (1.0)^2, the pessimistic term wins
    assert clipped.item() == pytest.approx(0.5 * (1.8 ** 2 + 1.1 ** 2) / 2)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)


def test_entropy_of_uniform_is_log_v():
    logits = torch.zeros(2, 3, 7)
    assert entropy(logits, torch.ones(2, 3)).item() == pytest.approx(math.log(7))


def test_kl_estimators():
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    k1 = kl_penalty(lp, ref, "k1")
    assert k1.tolist()[0] == pytest.approx([math.log(2), math.log(0.5)])
    k2 = kl_penalty(lp, ref, "k2")
    assert k2.tolist()[0] == pytest.approx([0.5 * math.log(2) ** 2, 0.5 * math.log(0.5) ** 2])
    k3 = kl_penalty(lp, ref, "k3")                 # r = p_ref / p = 0.5 and 2
    assert k3.tolist()[0] == pytest.approx([(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2)])
    assert (k3 >= 0).all()
    for est in ("k1", "k2", "k3"):
        assert (kl_penalty(lp, lp, est) == 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    true_kl = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    for est in ("k1", "k3"):
        assert kl_penalty(lp, lq, est).mean().item() == pytest.approx(true_kl.item(), abs=0.01)


def test_full_kl_is_the_exact_kl_and_the_mean_of_k1():
    g = torch.Generator().manual_seed(1)
    logits, ref_logits = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    exact = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits),
                                              torch.distributions.Categorical(logits=ref_logits))
    assert torch.allclose(full_kl(lp, lq), exact, atol=1e-6)
    assert (full_kl(lp, lp).abs() < 1e-7).all()
    # k1 on tokens sampled from pi estimates the same number (one distribution, 200k draws).
    x = torch.multinomial(lp[0, 0].exp(), 200_000, replacement=True, generator=g)
    k1 = kl_penalty(lp[0, 0][x], lq[0, 0][x], "k1").mean()
    assert k1.item() == pytest.approx(full_kl(lp[0, 0], lq[0, 0]).item(), abs=0.01)


def test_full_kl_gradient_moves_every_token_toward_the_reference():
    # d KL / d logits_v = pi_v * (log pi_v - log q_v - KL): every token, sampled or not.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, generator=g, requires_grad=True)
    lq = torch.log_softmax(torch.randn(7, generator=g), -1)
    lp = torch.log_softmax(logits, -1)
    kl = full_kl(lp, lq)
    kl.backward()
    p = lp.detach().exp()
    expect = p * (lp.detach() - lq - kl.detach())
    assert torch.allclose(logits.grad, expect, atol=1e-6)

"""The objectives of issue 39 on hand-computed values: decoupled clipping (DAPO), sequence-level
ratios (GSPO), truncated importance weights (TIS), the overlong term; the settings' errors and
the named recipes."""

from __future__ import annotations

import math

import pytest
import torch

from ppolm import ConfigError, PPOConfig
from ppolm.config.recipes import RECIPES
from ppolm.config.run_spec import RunSpec
from ppolm.engines.base import ResponseForward
from ppolm.maths.aggregation import aggregate_loss
from ppolm.maths.losses import policy_loss, truncated_is_weights
from ppolm.maths.rewards import overlong_penalty
from ppolm.rollout.types import Advantages, Rollout
from ppolm.training.objective import ppo_loss

D = torch.float64


def test_decoupled_clipping_clips_each_side_at_its_own_epsilon():
    old = torch.zeros(1, 4, dtype=D)
    new = torch.log(torch.tensor([[1.5, 1.25, 0.5, 0.7]], dtype=D))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=D)
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 4, dtype=D), clip_range=0.2,
                              clip_range_high=0.28)
    # A>0, r=1.5 -> clipped at 1.28: -1.28 ; A>0, r=1.25 (inside 1.28, over 1.2): -1.25 ;
    # A<0, r=0.5 -> clipped at 0.8: 0.8 ; A<0, r=0.7 -> clipped at 0.8: 0.8
    assert loss.item() == pytest.approx((-1.28 - 1.25 + 0.8 + 0.8) / 4, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(3 / 4)
    symmetric, _ = policy_loss(new, old, adv, torch.ones(1, 4, dtype=D), clip_range=0.2)
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 0.8) / 4, abs=1e-12)
    new = new.clone().requires_grad_(True)
    policy_loss(new, old, adv, torch.ones(1, 4, dtype=D), clip_range=0.2,
                clip_range_high=0.28)[0].backward()
    # only token 2 (r=1.25 under the higher clip) moves: d(-r)/d log r = -r, over 4 tokens
    assert new.grad[0].tolist() == pytest.approx([0.0, -1.25 / 4, 0.0, 0.0], abs=1e-12)


def gspo_reference(new, old, adv, mask, low, high):
    """GSPO's sequence objective written directly: s_i = exp(mean_t log ratio), one advantage
    per sequence (its first token's), the mean over sequences of max(-A s, -A clip(s))."""
    m = mask.to(new.dtype)
    s = torch.exp(((new - old) * m).sum(1) / m.sum(1))
    a = adv[:, 0]
    per_seq = torch.maximum(-a * s, -a * torch.clamp(s, 1 - low, 1 + high))
    return per_seq.mean()


@pytest.mark.parametrize(("low", "high"), [(0.2, 0.28), (0.01, 0.01)])
def test_sequence_ratios_are_gspo_in_value_and_gradient(low, high):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=D)                  # ragged: 2 and 3
    old = torch.log(torch.tensor([[0.5, 0.4, 0.9], [0.3, 0.2, 0.6]], dtype=D))
    step = torch.tensor([[0.1, -0.3, 5.0], [0.02, 0.04, 0.06]], dtype=D)  # padding: anything
    adv = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=D) * mask
    new_a = (old + step).requires_grad_(True)
    new_b = (old + step).requires_grad_(True)

    def agg(per_token):
        return aggregate_loss(per_token, mask, "seq-mean-token-mean")

    loss, stats = policy_loss(new_a, old, adv, mask, clip_range=low, clip_range_high=high,
                              aggregate=agg, ratio_level="sequence")
    ref = gspo_reference(new_b, old, adv, mask, low, high)
    loss.backward()
    ref.backward()
    # s = exp(-0.1) and exp(0.04)
    if low == 0.2:
        assert loss.item() == pytest.approx(-(math.exp(-0.1) + math.exp(0.04)) / 2, abs=1e-12)
    else:   # sequence 2's s = 1.0408 > 1.01 with A > 0: clipped, all 3 of its tokens;
        # sequence 1's s = 0.905 < 0.99 with A > 0: the unclipped term is the larger loss
        assert loss.item() == pytest.approx(-(math.exp(-0.1) + 1.01) / 2, abs=1e-12)
        assert stats["clipfrac"].item() == pytest.approx(3 / 5)
        assert (new_a.grad[1] == 0).all() and (new_a.grad[0, :2] != 0).all()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    assert torch.allclose(new_a.grad, new_b.grad, atol=1e-12)
    assert (new_a.grad[0, 2] == 0).all()                                 # padding: no gradient


def test_token_and_sequence_ratios_agree_at_ratio_one():
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=D))
    adv = torch.tensor([[1.0, -2.0, 4.0]], dtype=D)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)
    a, _ = policy_loss(lp, lp.clone(), adv, mask, ratio_level="token")
    b, _ = policy_loss(lp, lp.clone(), adv, mask, ratio_level="sequence")
    assert a.item() == b.item() == pytest.approx(0.5)


def test_truncated_importance_weights_scale_each_token_by_the_capped_ratio():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)
    old = torch.log(torch.tensor([[0.5, 0.4, 0.9], [0.3, 0.2, 0.6]], dtype=D))
    # the sampler's probabilities: pi_old / pi_rollout = 0.5, 1, 4 (capped at 2) ; 1.5, 0.8
    rollout = old - torch.log(torch.tensor([[0.5, 1.0, 4.0], [1.5, 0.8, 1.0]], dtype=D))
    w = truncated_is_weights(old, rollout, mask, cap=2.0)
    assert w.flatten().tolist() == pytest.approx([0.5, 1.0, 2.0, 1.5, 0.8, 0.0], abs=1e-12)
    new = old + torch.tensor([[0.1, 0.0, -0.1], [0.0, 0.3, 0.0]], dtype=D)
    adv = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 0.0]], dtype=D)
    loss, _ = policy_loss(new, old, adv, mask, clip_range=0.2, weights=w)
    r = torch.exp(new - old)
    per_token = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    assert loss.item() == pytest.approx(float((w * per_token).sum() / 5), abs=1e-12)
    with pytest.raises(Exception, match="cap"):
        truncated_is_weights(old, rollout, mask, cap=0.0)


def minibatch(sampler_shift: float = 0.0):
    """A Rollout, its advantages and the forward of a policy that moved a little, with the
    sampler's logprobs ``sampler_shift`` nats under the trainer's."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    old = -torch.rand(2, 4, generator=g) * mask
    new = old + 0.05 * torch.randn(2, 4, generator=g)
    roll = Rollout(input_ids=torch.zeros(2, 6, dtype=torch.long),
                   attention_mask=torch.ones(2, 6), response_mask=mask, logprobs=old,
                   ref_logprobs=old, values=torch.zeros(2, 4), scores=torch.zeros(2),
                   index=torch.arange(2), sampler_logprobs=(old - sampler_shift) * mask)
    adv = torch.randn(2, 4, generator=g) * mask
    fwd = ResponseForward(logprobs=new, entropy=torch.zeros(2, 4), hidden=torch.zeros(2, 4, 3))
    return roll, Advantages(adv, adv, adv), fwd


def test_tis_with_no_mismatch_is_the_loss_without_it_bitwise():
    roll, adv, fwd = minibatch(sampler_shift=0.0)
    base = dict(advantage_estimator="grpo", samples_per_prompt=2, batch_size=2,
                minibatch_size=2, rollout_logprobs="forward")
    plain, _ = ppo_loss(PPOConfig(**base), fwd, None, roll, adv, torch.tensor(5.0), 2, 4, 0.0)
    tis, _ = ppo_loss(PPOConfig(**base, tis_cap=2.0), fwd, None, roll, adv,
                      torch.tensor(5.0), 2, 4, 0.0)
    assert torch.equal(plain, tis)
    shifted, _ = minibatch(sampler_shift=0.3)[0], None
    moved, _ = ppo_loss(PPOConfig(**base, tis_cap=2.0), fwd, None, shifted, adv,
                        torch.tensor(5.0), 2, 4, 0.0)
    # every weight is exp(0.3) = 1.35 (under the cap): the loss scales by it
    assert moved.item() == pytest.approx(plain.item() * math.exp(0.3), rel=1e-5)


def test_overlong_term_falls_linearly_over_the_buffer():
    lengths = torch.tensor([0, 12, 13, 14, 15, 16])
    # budget 16, buffer 4: 0 up to 12 tokens, then -1/4 per token to -1 at 16
    assert overlong_penalty(lengths, 16, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0]
    assert overlong_penalty(lengths, 16, 4, factor=0.5)[-1].item() == -0.5
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 16, 17)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(clip_range_low=0.3, clip_range_high=0.2), "below clip_range_low"),
    (dict(clip_range=0.3, clip_range_high=0.28), "below clip_range_low"),
    (dict(clip_range_high=-0.1), "must be > 0"),
    (dict(tis_cap=2.0), "rollout_logprobs"),
    (dict(tis_cap=0.0, rollout_logprobs="forward"), "must be > 0"),
    (dict(dynamic_sampling=True), "grouped estimators"),
    (dict(dynamic_sampling=True, advantage_estimator="reinforce_pp"), "grouped estimators"),
    (dict(dynamic_sampling=True, advantage_estimator="grpo"), "samples_per_prompt >= 2"),
    (dict(dynamic_sampling=True, advantage_estimator="grpo", samples_per_prompt=4,
          max_sampling_rounds=0), "max_sampling_rounds"),
    (dict(ratio_level="sentence"), "ratio_level"),
])
def test_bad_objective_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        PPOConfig(**settings)


def test_each_recipe_builds_and_overrides_win():
    for name, recipe in RECIPES.items():
        cfg = PPOConfig.recipe(name)
        for key, value in recipe.settings.items():
            assert getattr(cfg, key) == value, (name, key)
        assert recipe.reference
    dapo = PPOConfig.recipe("dapo", samples_per_prompt=8, clip_range_high=0.3)
    assert (dapo.samples_per_prompt, dapo.clip_high, dapo.clip_low) == (8, 0.3, 0.2)
    assert dapo.dynamic_sampling and dapo.kl_coef == 0.0
    gspo = PPOConfig.recipe("gspo")
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)
    with pytest.raises(ConfigError, match="unknown recipe 'dappo'.*dapo"):
        PPOConfig.recipe("dappo")


def test_the_yaml_recipe_key_sets_the_recipe_and_its_group_size(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: continue\nppo:\n  recipe: dapo\n  learning_rate: 1.0e-4\n")
    spec = RunSpec.load(path, [])
    assert spec.ppo.dynamic_sampling and spec.ppo.clip_high == 0.28
    assert spec.ppo.learning_rate == 1e-4
    assert spec.sampling.samples_per_prompt == spec.ppo.samples_per_prompt == 4
    spec = RunSpec.load(path, ["recipe=gspo", "sampling.samples_per_prompt=8"])
    assert spec.ppo.ratio_level == "sequence" and spec.ppo.samples_per_prompt == 8
    with pytest.raises(ConfigError, match="unknown recipe"):
        RunSpec.load(path, ["ppo.recipe=nope"])
    assert PPOConfig.from_dict({"recipe": "grpo", "kl_coef": 0.0}).kl_coef == 0.0


def test_health_warns_when_most_groups_have_no_signal_unless_they_are_dropped():
    from ppolm.observe.health import HealthMonitor

    class View:
        config = PPOConfig(advantage_estimator="grpo", samples_per_prompt=4)

    monitor = HealthMonitor()
    monitor.on_iteration_end(View(), {"iteration": 1, "zero_signal_groups": 0.75})
    assert [w["name"] for w in monitor.warnings] == ["no_signal"]
    assert "dynamic_sampling=True" in monitor.warnings[0]["message"]
    View.config = PPOConfig(advantage_estimator="grpo", samples_per_prompt=4,
                            dynamic_sampling=True, ratio_level="sequence")
    quiet = HealthMonitor()
    quiet.on_iteration_end(View(), {"iteration": 1, "zero_signal_groups": 0.75,
                                    "clipfrac": 0.9})
    assert quiet.warnings == []

"""The KL budget: the weight path between reference and trained policy is exact at its ends and
linear between them, and fit_kl_budget leaves the policy at a measured KL within the budget,
its second try at alpha = sqrt(aim / KL(1)); with a band it extrapolates past the trained
weights when the KL is under it, and shrinks until the KL is inside it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ppolm import CallableReward, TransformerPolicy, char_tokenizer, evaluate
from ppolm.errors import ConfigError
from ppolm.evaluation.kl_budget import WeightPath, fit_kl_budget

ALPHABET = "abcdefghij"
PROMPTS = ["abc", "bcd", "cde", "def", "efg", "fgh", "ghi", "hij"]
KW = dict(max_new_tokens=8, seed=5)


def reward():
    return CallableReward(lambda prompts, responses: [float(r.count("a")) for r in responses])


@pytest.fixture
def pair():
    """A tiny reference and a 'trained' copy whose top block and head moved away from it."""
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    reference = TransformerPolicy(len(tok), hidden_size=32, n_layers=2, n_heads=4).eval()
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.startswith(("blocks.1.", "tok_emb")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return policy, reference, tok


def test_weight_path_is_exact_at_both_ends_and_linear_between(pair):
    policy, reference, _ = pair
    trained = {k: v.clone() for k, v in policy.state_dict().items()}
    ref = reference.state_dict()
    path = WeightPath(policy, reference)
    moved = ("blocks.1.", "tok_emb", "lm_head")
    assert path.changed and all(n.startswith(moved) for n in path.changed)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    path.set(0.0)
    assert all(torch.equal(v, ref[k]) for k, v in policy.state_dict().items())
    assert torch.equal(policy(ids, mask).logits, reference(ids, mask).logits)
    path.set(0.25)
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(v, ref[k] + 0.25 * (trained[k] - ref[k]))
    path.set(1.0)
    assert all(torch.equal(v, trained[k]) for k, v in policy.state_dict().items())
    assert path.alpha == 1.0


def test_weight_path_refuses_another_architecture(pair):
    policy, _, tok = pair
    other = TransformerPolicy(len(tok), hidden_size=32, n_layers=3, n_heads=4)
    with pytest.raises(ConfigError, match="different parameters"):
        WeightPath(policy, other)
    with pytest.raises(ConfigError, match="finite"):
        WeightPath(policy, copy.deepcopy(policy)).set(float("nan"))


def test_fit_shrinks_to_a_measured_kl_within_the_budget(pair):
    policy, reference, tok = pair
    full = evaluate(policy, tok, PROMPTS, reward(), reference=reference, **KW).kl
    assert full is not None and full > 1.0            # the perturbation is far from the reference
    budget = full / 3
    fit = fit_kl_budget(policy, reference, tok, PROMPTS, reward(), budget, max_tries=4, **KW)
    first, second = fit.tries[0], fit.tries[1]
    assert first["alpha"] == 1.0 and first["kl"] == pytest.approx(full)
    assert second["alpha"] == pytest.approx(math.sqrt(budget / full))
    assert fit.met and fit.kl <= budget and 0 < fit.alpha < 1
    assert [t["kl"] for t in fit.tries] == sorted((t["kl"] for t in fit.tries), reverse=True)
    # The policy is left at the last alpha tried: measuring again gives the same figure.
    again = evaluate(policy, tok, PROMPTS, reward(), reference=reference, **KW)
    assert again.kl == pytest.approx(fit.kl) and again.reward_mean == pytest.approx(
        fit.reward_mean)


def test_fit_leaves_a_policy_within_the_budget_as_trained(pair):
    policy, reference, tok = pair
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    fit = fit_kl_budget(policy, reference, tok, PROMPTS, reward(), 1e6, **KW)
    assert fit.alpha == 1.0 and fit.met and len(fit.tries) == 1
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_fit_that_runs_out_of_tries_says_so(pair):
    policy, reference, tok = pair
    fit = fit_kl_budget(policy, reference, tok, PROMPTS, reward(), 1.0, max_tries=1, **KW)
    assert len(fit.tries) == 1 and not fit.met and fit.alpha == 1.0 and fit.kl > 1.0


@pytest.mark.parametrize("budget", [0.0, -1.0, float("nan"), float("inf")])
def test_fit_refuses_a_budget_that_is_not_a_positive_number(pair, budget):
    policy, reference, tok = pair
    with pytest.raises(ConfigError, match="budget"):
        fit_kl_budget(policy, reference, tok, PROMPTS, reward(), budget, **KW)


def test_fit_extrapolates_past_the_trained_weights_when_under_the_band(pair):
    policy, reference, tok = pair
    full = evaluate(policy, tok, PROMPTS, reward(), reference=reference, **KW).kl
    assert full is not None
    budget, tolerance = 2.5 * full, full                 # band [1.5, 2.5] x KL(1), aim 2 x KL(1)
    fit = fit_kl_budget(policy, reference, tok, PROMPTS, reward(), budget, max_tries=4,
                        max_alpha=3.0, tolerance=tolerance, **KW)
    assert fit.tries[0]["alpha"] == 1.0 and fit.tries[0]["kl"] == pytest.approx(full)
    assert fit.tries[1]["alpha"] == pytest.approx(math.sqrt(2.0))        # sqrt(aim / KL(1))
    assert fit.tries[1]["kl"] > full                      # further from the reference: more KL
    # the kept try: the highest KL within the budget, and the policy is left there
    within = [t for t in fit.tries if t["kl"] <= budget]
    assert fit.kl == max(t["kl"] for t in within) and fit.met and fit.alpha > 1.0
    again = evaluate(policy, tok, PROMPTS, reward(), reference=reference, **KW)
    assert again.kl == pytest.approx(fit.kl)


def test_fit_with_a_band_keeps_shrinking_until_the_kl_is_inside_it(pair):
    policy, reference, tok = pair
    full = evaluate(policy, tok, PROMPTS, reward(), reference=reference, **KW).kl
    assert full is not None
    budget, tolerance = full / 2, full / 4               # band [0.25, 0.5] x KL(1)
    fit = fit_kl_budget(policy, reference, tok, PROMPTS, reward(), budget, max_tries=6,
                        tolerance=tolerance, **KW)
    assert fit.met and budget - tolerance <= fit.kl <= budget and fit.alpha < 1.0
    assert fit.tries[-1]["kl"] == fit.kl                  # it stopped at the first try in the band


def test_fit_refuses_extrapolation_without_a_band_and_a_band_wider_than_the_budget(pair):
    policy, reference, tok = pair
    with pytest.raises(ConfigError, match="tolerance > 0"):
        fit_kl_budget(policy, reference, tok, PROMPTS, reward(), 5.0, max_alpha=1.5, **KW)
    with pytest.raises(ConfigError, match="tolerance"):
        fit_kl_budget(policy, reference, tok, PROMPTS, reward(), 5.0, tolerance=5.0, **KW)
    with pytest.raises(ConfigError, match="max_alpha"):
        fit_kl_budget(policy, reference, tok, PROMPTS, reward(), 5.0, max_alpha=0.5, **KW)


def test_a_lora_policy_moves_along_the_merged_weights_line_to_its_disabled_adapters():
    """LoRA: the reference is the policy with its adapters off; the path scales the active
    adapter's B, so the merged weights lie on the line W0 + alpha * (W1 - W0), and the fit
    runs on it."""
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama
    from ppolm import HFPolicy
    from ppolm.policies.lora import merged_copy

    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    policy = HFPolicy(tiny_llama(len(tok)), peft_config=peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():                             # "trained": B away from its zero start
        policy.lm.lm_head.weight.mul_(10)             # (a random head is nearly uniform)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    reference = policy.reference_model()
    ids = torch.tensor([[3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    base = {k: v.clone() for k, v in merged_copy(policy.model).state_dict().items()}
    path = WeightPath(policy, reference)
    with torch.no_grad():
        path.set(1.0)
        trained_logits = policy(ids, mask).logits
        merged_1 = merged_copy(policy.model).state_dict()
        path.set(0.0)
        base = merged_copy(policy.model).state_dict()
        torch.testing.assert_close(policy(ids, mask).logits, reference(ids, mask).logits,
                                   rtol=0, atol=0)
        path.set(0.5)
        for k, v in merged_copy(policy.model).state_dict().items():
            torch.testing.assert_close(v, base[k] + 0.5 * (merged_1[k] - base[k]),
                                       rtol=1e-5, atol=1e-6)
        path.set(1.0)
        assert torch.equal(policy(ids, mask).logits, trained_logits)
    assert path.changed and all("lora_B" in n for n in path.changed)
    assert not torch.equal(merged_1["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])

    kl_1 = evaluate(policy, tok, PROMPTS, reward(), reference, **KW).kl
    assert kl_1 > 0.5
    fit = fit_kl_budget(policy, reference, tok, PROMPTS, reward(), kl_1 / 4, max_tries=6, **KW)
    assert fit.met and fit.alpha < 1.0 and fit.kl <= kl_1 / 4

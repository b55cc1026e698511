"""The evaluation harness: distinct-2 and the KL figure on hand-made inputs, then evaluate() on a
tiny real policy (fixed seed, KL about 0 against itself, a hand-checkable reward), the KL to a
different reference against an independent computation, and through a Trainer's fast engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import tiny_llama
from ppolm import (
    CallableReward,
    EvalResult,
    HFPolicy,
    PlainEngine,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    char_tokenizer,
    evaluate,
    freeze_lower_layers,
)
from ppolm.engines import Sequences
from ppolm.errors import DataError
from ppolm.evaluation.evaluate import distinct_n, format_pairs, format_table
from ppolm.maths.losses import sequence_kl

ALPHABET = "abcdefghij"


def test_distinct_2_counts_unique_word_bigrams_over_all_texts():
    # bigrams: (a b) (b c) | (a b) (b d) -> 3 distinct of 4
    assert distinct_n(["a b c", "A b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["x y x y x y"], 2) == pytest.approx(2 / 5)   # (x y) (y x) repeated
    assert distinct_n(["one"], 2) == 0.0                               # no bigram at all
    assert distinct_n(["a b c d"], 1) == 1.0
    with pytest.raises(DataError):
        distinct_n(["a b"], 0)


def test_sequence_kl_sums_k1_over_valid_tokens_only():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.1, 0.4, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = sequence_kl(logp, ref, mask)
    # row 0: log 2 + log 1 (third token is padding); row 1: 0 + log(1/2) + 0
    assert kl.tolist() == pytest.approx([math.log(2), -math.log(2)])
    with pytest.raises(DataError):
        sequence_kl(logp, ref, mask[:, :2])


def first_char_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0 if r.startswith("a") else -1.0 for r in responses]


@pytest.fixture
def setup():
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    policy = TransformerPolicy(len(tok), hidden_size=32, n_layers=2, n_heads=4).eval()
    prompts = ["abc", "bcd", "cde", "def", "efg"]
    return policy, tok, prompts, CallableReward(first_char_reward)


def test_evaluate_against_itself_and_a_hand_checkable_reward(setup, tmp_path):
    policy, tok, prompts, reward = setup
    res = evaluate(policy, tok, prompts, reward, reference=policy, max_new_tokens=6,
                   batch_size=2, seed=3, out=tmp_path / "eval.json")
    assert res.n == 5 and [s.prompt for s in res.samples] == prompts     # every prompt, in order
    # the sampler's logprobs against a forward pass of the same weights: 0 up to rounding
    assert abs(res.kl) < 1e-4 and all(abs(s.kl) < 1e-4 for s in res.samples)
    expected = [first_char_reward([], [s.response])[0] for s in res.samples]
    assert [s.reward for s in res.samples] == expected
    assert res.reward_mean == pytest.approx(sum(expected) / 5)
    assert res.positive_share == pytest.approx(sum(e > 0.05 for e in expected) / 5)
    assert 1 <= res.response_length <= 6 and 0 <= res.eos_fraction <= 1
    assert EvalResult.load(tmp_path / "eval.json") == res


def test_evaluate_is_reproducible_with_its_seed_and_leaves_training_mode(setup):
    policy, tok, prompts, reward = setup
    policy.train()
    a = evaluate(policy, tok, prompts, reward, max_new_tokens=6, seed=7)
    b = evaluate(policy, tok, prompts, reward, max_new_tokens=6, seed=7)
    c = evaluate(policy, tok, prompts, reward, max_new_tokens=6, seed=8)
    assert [s.response for s in a.samples] == [s.response for s in b.samples]
    assert [s.response for s in a.samples] != [s.response for s in c.samples]
    assert a.kl is None and policy.training


def test_kl_to_a_different_reference_is_the_mean_of_per_response_sums(setup):
    policy, tok, prompts, reward = setup
    torch.manual_seed(1)
    other = TransformerPolicy(len(tok), hidden_size=32, n_layers=2, n_heads=4).eval()
    res = evaluate(policy, tok, prompts, reward, reference=other, max_new_tokens=6)
    per = [s.kl for s in res.samples]
    assert res.kl == pytest.approx(sum(per) / len(per)) and any(abs(k) > 1e-3 for k in per)


def perturbed(policy, scale: float = 0.3, seed: int = 1):
    """A copy of ``policy`` with Gaussian noise (std ``scale``) added to its trainable weights."""
    other = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return other.eval()


def forward_kl(policy, reference, tok, prompts, reward, *, max_new_tokens, temperature, seed,
               batch_size):
    """Evaluate's KL figure computed another way: the same draws (one generator seeded with
    ``seed``, the prompts in batches in order), then the per-response sum of
    log p - log p_ref with both logprobs from PlainEngine forward passes over the finished
    sequences. Returns (responses, per-response KLs)."""
    env = TextGenerationEnv(prompts, tok, reward, max_new_tokens=max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    engine = PlainEngine("cpu", bf16=False)
    responses, kls = [], []
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        with torch.no_grad():
            ep = env.sample(policy, len(idx), temperature, torch.device("cpu"), gen, indices=idx)
            seqs = Sequences(ep.input_ids, ep.attention_mask, ep.response_mask.shape[1])
            logp = engine.forward_response(policy, seqs, temperature).logprobs
            ref = engine.forward_response(reference, seqs, temperature).logprobs
        responses += ep.responses
        kls += ((logp - ref) * ep.response_mask).sum(1).tolist()
    return responses, kls


def test_kl_to_a_perturbed_reference_equals_an_independent_forward_computation(setup):
    policy, tok, prompts, reward = setup
    prompts = prompts * 4                                   # 20 responses
    reference = perturbed(policy)
    kw = dict(max_new_tokens=6, temperature=0.8, seed=11, batch_size=3)
    res = evaluate(policy, tok, prompts, reward, reference=reference, **kw)
    responses, kls = forward_kl(policy, reference, tok, prompts, reward, **kw)
    assert [s.response for s in res.samples] == responses          # the same draws
    assert [s.kl for s in res.samples] == pytest.approx(kls, abs=1e-4)
    assert res.kl == pytest.approx(sum(kls) / len(kls), abs=1e-4)
    assert res.kl > 0.5, res.kl                        # clearly not the policy itself
    # and against itself the same computation gives ~0, as evaluate does
    _, own = forward_kl(policy, policy, tok, prompts, reward, **kw)
    assert max(abs(k) for k in own) < 1e-6


def frozen_llama(tok):
    """A tiny llama with its lower layer frozen (the fast engine runs it once per batch) and a
    reference sharing that layer, its top layer perturbed."""
    torch.manual_seed(0)
    policy = freeze_lower_layers(HFPolicy(tiny_llama(len(tok))), 1)
    reference = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.model.model.layers[1].parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return policy, reference


@pytest.mark.parametrize("kind", ["transformer", "frozen_llama"])
def test_evaluate_through_a_trainers_fast_engine_gives_the_same_kl(setup, kind):
    policy, tok, prompts, reward = setup
    if kind == "transformer":
        reference = perturbed(policy)
    else:
        policy, reference = frozen_llama(tok)
    env = TextGenerationEnv(prompts, tok, reward, max_new_tokens=6)
    config = PPOConfig(iterations=1, batch_size=4, minibatch_size=2, engine="fast_cpu",
                       device="cpu", progress=False)
    trainer = Trainer(policy, env, config, reference=reference)
    assert trainer.engine.name != "plain"
    if kind == "frozen_llama":     # the engine reuses the frozen layer's output from sampling
        assert trainer.engine.depth == 1 and trainer.engine.ref_shares_bottom
    kw = dict(reference=trainer.reference, max_new_tokens=6, batch_size=2, seed=4)
    fast = evaluate(trainer.policy, tok, prompts, reward, engine=trainer.engine, **kw)
    plain = evaluate(trainer.policy, tok, prompts, reward, **kw)
    assert [s.response for s in fast.samples] == [s.response for s in plain.samples]
    assert [s.kl for s in fast.samples] == pytest.approx([s.kl for s in plain.samples],
                                                          abs=1e-4)
    assert fast.kl == pytest.approx(plain.kl, abs=1e-4) and abs(plain.kl) > 1e-2


def test_table_and_pairs(setup):
    policy, tok, prompts, reward = setup
    a = evaluate(policy, tok, prompts, reward, reference=policy, max_new_tokens=4)
    table = format_table({"before": a, "after": a})
    assert "| mean reward |" in table and "| KL to reference (nats/response) | 0.00 |" in table
    pairs = format_pairs(a, a, k=2, labels=["first", "second"])
    assert pairs.count("- before") == 2 and "**second**" in pairs


def test_samples_per_prompt_repeats_the_prompts_and_keeps_the_one_sample_draws_first(setup):
    policy, tok, prompts, reward = setup
    torch.manual_seed(1)
    other = TransformerPolicy(len(tok), hidden_size=32, n_layers=2, n_heads=4).eval()
    kw = dict(reference=other, max_new_tokens=6, batch_size=2, seed=5)   # 5 prompts: 2+2+1
    one = evaluate(policy, tok, prompts, reward, **kw)
    three = evaluate(policy, tok, prompts, reward, samples_per_prompt=3, **kw)
    assert three.n == 15 and three.samples_per_prompt == 3
    assert [s.prompt for s in three.samples] == prompts * 3
    assert three.samples[:5] == one.samples               # the first pass draws the same
    assert [s.response for s in three.samples[5:10]] != [s.response for s in one.samples]
    # the means and their standard errors over all 15 responses
    r = torch.tensor([s.reward for s in three.samples], dtype=torch.float64)
    k = torch.tensor([s.kl for s in three.samples], dtype=torch.float64)
    assert three.reward_mean == pytest.approx(float(r.mean()))
    assert three.reward_se == pytest.approx(float(r.std()) / math.sqrt(15))
    assert three.kl == pytest.approx(float(k.mean()))
    assert three.kl_se == pytest.approx(float(k.std()) / math.sqrt(15))
    assert "±" in format_table({"after": three})
    with pytest.raises(DataError, match="samples_per_prompt"):
        evaluate(policy, tok, prompts, reward, samples_per_prompt=0)

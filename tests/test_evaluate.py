"""The evaluation harness: distinct-2 and the KL figure on hand-made inputs, then evaluate() on a
tiny real policy (fixed seed, KL exactly 0 against itself, a hand-checkable reward)."""

from __future__ import annotations

import math

import pytest
import torch

from ppolm import CallableReward, EvalResult, TransformerPolicy, char_tokenizer, evaluate
from ppolm.errors import DataError
from ppolm.evaluation.evaluate import distinct_n, format_pairs, format_table, sequence_kl

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
    assert res.kl == 0.0 and all(s.kl == 0.0 for s in res.samples)
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

"""TextGenerationEnv and sampling: EOS handling, filters, penalties, prompt files, and the
checks on what a reward function returns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppolm import CallableReward, RewardFunction, TextGenerationEnv, TransformerPolicy
from ppolm.errors import ConfigError, DataError, RewardError
from ppolm.rollout.rewards import WeightedReward
from ppolm.rollout.sampling import filter_logits, sample


class Length(RewardFunction):
    def __call__(self, prompts, responses):
        return [float(len(r)) for r in responses]


def make_env(tok, reward=None, **kw):
    return TextGenerationEnv(["abc", "defgh", "ij"], tok, reward or Length(), **kw)


def test_sampling_stops_at_eos_and_masks_after_it(tok):
    policy = TransformerPolicy(len(tok), hidden_size=32)   # untrained: EOS ~1/14 per step
    env = make_env(tok, max_new_tokens=12)
    ep = env.sample(policy, 64, temperature=1.0, device=torch.device("cpu"))
    resp = ep.input_ids[:, -ep.response_mask.shape[1]:]
    for ids, m, ended in zip(resp.tolist(), ep.response_mask.tolist(), ep.ended.tolist(),
                             strict=True):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)           # contiguous, then padding
        assert all(t == tok.pad_token_id for t in ids[n:])
        assert ended == (ids[n - 1] == tok.eos_token_id)
        assert tok.eos_token_id not in ids[: n - 1]          # nothing after the first EOS
    assert ep.ended.any() and (ep.response_mask.sum(1) > 1).any()


def test_sampling_stops_early_when_all_rows_end(tok):
    class AlwaysEOS(TransformerPolicy):
        def head(self, hidden):
            logits = torch.full((*hidden.shape[:-1], self.vocab_size), -1e9)
            logits[..., 1] = 0.0
            return logits

    policy = AlwaysEOS(len(tok), hidden_size=32)
    ids = torch.tensor([[4, 5, 6]])
    out, mask = sample(policy, ids, torch.ones_like(ids), 10, eos_token_id=1, pad_token_id=0)
    assert out.tolist() == [[1]] and mask.tolist() == [[1]]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, top_p=0.7)          # 0.5 < 0.7 <= 0.8: keep the first two
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    p1 = filter_logits(logits, top_p=0.4)         # the top token alone already reaches 0.4
    assert torch.isfinite(p1[0, 0]) and torch.isinf(p1[0, 1:]).all()


def test_missing_eos_penalty_is_subtracted_from_responses_that_never_end(tok):
    # As TRL's field of the same name: a positive penalty LOWERS the score of a response that
    # never emitted an end token, by exactly the penalty; a response that ended keeps its score.
    policy = TransformerPolicy(len(tok), hidden_size=32)
    cpu = torch.device("cpu")
    plain = make_env(tok, max_new_tokens=3)
    penalised = make_env(tok, max_new_tokens=3, missing_eos_penalty=1.0)
    base = plain.sample(policy, 32, 1.0, cpu, torch.Generator().manual_seed(0))
    ep = penalised.sample(policy, 32, 1.0, cpu, torch.Generator().manual_seed(0))
    assert torch.equal(ep.input_ids, base.input_ids)           # the same responses
    assert ep.ended.any() and (~ep.ended).any()
    assert (base.scores > 0).any()                             # Length: not all zero
    assert ep.scores[ep.ended].tolist() == base.scores[ep.ended].tolist()
    assert (ep.scores[~ep.ended] - base.scores[~ep.ended]).tolist() == [-1.0] * int(
        (~ep.ended).sum())


@pytest.mark.parametrize("penalty", [-1.0, -0.5, -1, float("nan")])
def test_a_negative_missing_eos_penalty_is_refused(tok, penalty):
    with pytest.raises(DataError, match="SUBTRACTED.*give a positive number \\(e.g. 1.0\\)"):
        make_env(tok, missing_eos_penalty=penalty)
    make_env(tok, missing_eos_penalty=0.0)                      # no penalty: allowed


def test_env_spec_refuses_a_negative_missing_eos_penalty():
    from ppolm.run import EnvSpec

    with pytest.raises(ConfigError, match="missing_eos_penalty=-1 is SUBTRACTED.*positive"):
        EnvSpec(missing_eos_penalty=-1)
    assert EnvSpec(missing_eos_penalty=1.0).missing_eos_penalty == 1.0


class AOrC(TransformerPolicy):
    """Draws 'a' or 'c', each with probability 1/2; never EOS."""

    def head(self, hidden):
        logits = torch.full((*hidden.shape[:-1], self.vocab_size), -1e9)
        logits[..., [4, 6]] = 0.0                             # 'a', 'c' in the char tokenizer
        return logits


def test_stop_token_ids_end_a_response(tok):
    c = tok.convert_tokens_to_ids("c")
    assert c == 6 and tok.eos_token_id == 1
    policy = AOrC(len(tok), hidden_size=32)
    cpu = torch.device("cpu")
    env = make_env(tok, max_new_tokens=6, stop_token_ids=[c])
    assert env.stop_ids(policy) == [tok.eos_token_id, c]
    ep = env.sample(policy, 32, 1.0, cpu, torch.Generator().manual_seed(0))
    resp = ep.input_ids[:, -ep.response_mask.shape[1]:]
    lengths = ep.response_mask.sum(1).tolist()
    assert max(lengths) > 1 and min(lengths) < resp.shape[1]    # rows of several lengths
    assert ep.ended.any()
    for ids, m, ended, text in zip(resp.tolist(), ep.response_mask.tolist(),
                                   ep.ended.tolist(), ep.responses, strict=True):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)             # the stop token is a response token
        assert ids[n:] == [tok.pad_token_id] * (len(m) - n)
        assert c not in ids[: n - 1]                         # it ends the response at once
        assert ended == (ids[n - 1] == c)
        assert text == "a" * (n - 1 if ended else n)          # left out of the text
    assert ep.scores.tolist() == [float(len(t)) for t in ep.responses]

    # Without it, 'c' is an ordinary token: every response runs to max_new_tokens.
    plain = make_env(tok, max_new_tokens=6).sample(policy, 32, 1.0, cpu,
                                                   torch.Generator().manual_seed(0))
    assert plain.response_mask.shape == (32, 6) and bool(plain.response_mask.bool().all())
    assert not plain.ended.any() and any("c" in t for t in plain.responses)


@pytest.mark.parametrize("ids,words", [
    ([-1], "\\[-1\\] are not token ids"),
    ([1, "c"], "\\['c'\\] are not token ids"),
    ([2.0], "\\[2.0\\] are not token ids"),
    ([True], "\\[True\\] are not token ids"),
    (5, "must be a list of token ids"),
    ("abc", "must be a list of token ids"),
])
def test_bad_stop_token_ids(tok, ids, words):
    with pytest.raises(DataError, match=words):
        make_env(tok, stop_token_ids=ids)


def test_stop_token_ids_must_fit_the_vocabulary(tok):
    env = make_env(tok, stop_token_ids=[5, len(tok)])
    with pytest.raises(DataError, match=f"stop_token_ids \\[{len(tok)}\\] are outside"):
        env.check_policy(TransformerPolicy(len(tok), hidden_size=32))
    make_env(tok, stop_token_ids=[5, len(tok) - 1]).check_policy(
        TransformerPolicy(len(tok), hidden_size=32))


def test_prompt_order_covers_every_prompt_each_pass(tok):
    env = TextGenerationEnv([f"a{c}" for c in "abcdefghij"], tok, Length())
    first, second = env.next_indices(10), env.next_indices(10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    state = env.state_dict()
    more = env.next_indices(7)
    env.load_state_dict(state)
    assert env.next_indices(7) == more


def test_prompt_files(tok, tmp_path):
    (tmp_path / "p.txt").write_text("abc\n\nde\\nf\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "abc"}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(["abc", "d"]))
    assert make_env_from(tok, tmp_path / "p.txt").prompts == ["abc", "de\nf"]
    assert make_env_from(tok, tmp_path / "p.jsonl").prompts == ["abc"]
    assert make_env_from(tok, tmp_path / "p.json").prompts == ["abc", "d"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        make_env_from(tok, tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not exist"):
        make_env_from(tok, tmp_path / "missing.txt")


def make_env_from(tok, path):
    return TextGenerationEnv(path, tok, Length())


@pytest.mark.parametrize("prompts,words", [
    ([], "non-empty list"),
    (["abc", ""], "prompt 1"),
    (["abc", "   "], "prompt 1"),
])
def test_bad_prompts(tok, prompts, words):
    with pytest.raises(DataError, match=words):
        TextGenerationEnv(prompts, tok, Length())


def test_prompt_longer_than_context(tok):
    env = TextGenerationEnv(["abcdefghij" * 3], tok, Length(), max_new_tokens=8)
    with pytest.raises(DataError, match="exceeds the policy's context of 32"):
        env.check_policy(TransformerPolicy(len(tok), hidden_size=32, max_length=32))


def test_vocabulary_mismatch(tok):
    env = make_env(tok)
    with pytest.raises(DataError, match="disagree"):
        env.check_policy(TransformerPolicy(5, hidden_size=32))


@pytest.mark.parametrize("returned,words", [
    ([1.0], "returned 1 scores for 3"),
    ([1.0, float("nan"), 0.0], "nan at batch index 1"),
    ([1.0, 2.0, float("inf")], "inf at batch index 2"),
    (None, "NoneType"),
    (["good", 1.0, 2.0], "'good' \\(str\\) at batch index 0"),
    ([1.0, None, 2.0], "None \\(NoneType\\) at batch index 1"),
    (torch.ones(3, 1), "shape \\(3, 1\\)"),
    ("123", "returned str"),
])
def test_reward_outputs_are_checked(tok, returned, words):
    env = make_env(tok, reward=CallableReward(lambda p, r: returned))
    with pytest.raises(RewardError, match=words):
        env.score(["abc", "defgh", "ij"], ["x", "y", "z"])


def test_a_raising_reward_is_located(tok):
    def picky(prompts, responses):
        out = []
        for r in responses:
            if r == "boom":
                raise KeyError("no score for boom")
            out.append(1.0)
        return out

    env = make_env(tok, reward=CallableReward(picky))
    with pytest.raises(RewardError, match="KeyError.*batch index 1 \\(prompt 'defgh'"):
        env.score(["abc", "defgh", "ij"], ["ok", "boom", "ok"])


def test_tokenizer_without_pad_token_gets_eos(tok):
    tok.pad_token = None
    env = make_env(tok)
    assert env.tokenizer.pad_token_id == tok.eos_token_id


def test_weighted_reward_logs_each_part(tok):
    reward = WeightedReward({"len": (Length(), 0.5),
                             "one": (CallableReward(lambda p, r: [1.0] * len(r)), 2.0)})
    out = reward(["a", "b"], ["xx", "xxxx"])
    assert out == pytest.approx([0.5 * 2 + 2.0, 0.5 * 4 + 2.0])
    assert reward.parts() == {"len": 3.0, "one": 1.0}
    assert not math.isnan(sum(out))


def test_sequence_classifier_reward_scores_with_a_real_model(tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from ppolm import SequenceClassifierReward

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg)
    reward = SequenceClassifierReward(model, tok, batch_size=2)
    scores = reward(["abc", "de", "f"], ["ab", "cdefg", "h"])
    with torch.no_grad():
        alone = model(**tok(["decdefg"], return_tensors="pt")).logits[0, 0].item()
    assert len(scores) == 3 and scores[1] == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("penalty", [None, 1.0])
def test_prefix_shaping_rewards_each_token_with_the_score_increment(tok, penalty):
    # Length of the text so far: with one character per token, each token adds 1 but the
    # special ones (EOS, BOS, ...: not in the text) add 0; a missing-EOS penalty lands on the
    # last token.
    policy = TransformerPolicy(len(tok), hidden_size=32)
    env = make_env(tok, max_new_tokens=10, prefix_shaping=True, missing_eos_penalty=penalty)
    ep = env.sample(policy, 32, temperature=1.0, device=torch.device("cpu"),
                    generator=torch.Generator().manual_seed(0))
    resp = ep.input_ids[:, -ep.response_mask.shape[1]:]
    assert ep.ended.any() and (~ep.ended).any()
    for b in range(32):
        n = int(ep.response_mask[b].sum())
        expect = [0.0 if t in tok.all_special_ids else 1.0 for t in resp[b, :n].tolist()]
        if penalty is not None and not ep.ended[b]:
            expect[-1] -= penalty                          # subtracted
        expect += [0.0] * (resp.shape[1] - n)
        assert ep.token_scores[b].tolist() == pytest.approx(expect)
    assert torch.allclose(ep.token_scores.sum(1), ep.scores)


def test_score_increments_add_up_to_the_score():
    from ppolm.maths.rewards import score_increments

    phi = torch.tensor([[0.0, 0.1, 0.3, 0.9], [0.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = score_increments(phi, torch.tensor([0.7, -0.2]), mask)
    # phi beyond a row's end is ignored; the last real token gets score - phi[last]
    expect = torch.tensor([[0.1, 0.2, 0.4, 0.0], [0.5, -0.7, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(out, expect)

"""Multi-turn episodes on the character tokenizer: the token contract (the ids trained are the
ids sampled, the response mask covers exactly the model's tokens), the rewards of turns, the
limits, the per-episode generators, errors, and the trainer on episodes (first ratio 1 on both
engines; an interaction that never replies gives exactly today's rollouts and updates)."""

from __future__ import annotations

import random

import pytest
import torch

from ppolm import (
    ConfigError,
    DataError,
    Interaction,
    LSTMPolicy,
    PPOConfig,
    Reply,
    TextGenerationEnv,
    Trainer,
    TrainingError,
    TransformerPolicy,
    char_tokenizer,
)
from ppolm.engines.base import Sequences
from ppolm.engines.plain import PlainEngine

ALPHABET = "0123456789?=ab"
PROMPTS = ["ab", "ba", "aab", "b"]


class Lookup(Interaction):
    """The secret is told only to a model that asks ('?' in its first turn)."""

    def reset(self, prompt: str, rng: random.Random) -> dict:
        return {"secret": rng.randrange(10)}

    def reply(self, prompt, turns, state):
        return f"={state['secret']}" if len(turns) == 1 and "?" in turns[-1] else None


class Chatty(Interaction):
    """Replies of different lengths after every turn, with a reward for each turn."""

    def reply(self, prompt, turns, state):
        return Reply("=" * len(turns) + "ab"[len(turns) % 2], reward=0.5 * len(turns))


class Never(Interaction):
    def reply(self, prompt, turns, state):
        return None


def secret_reward(prompts, responses, turns, states):
    return [float(t[-1][:1] == str(s["secret"])) for t, s in zip(turns, states, strict=True)]


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


@pytest.fixture
def tok():
    return char_tokenizer(ALPHABET)


def sample(env, policy, n=8, seed=0, record=True):
    return env.sample(policy, n, 1.0, torch.device("cpu"), torch.Generator().manual_seed(seed),
                      record=record)


def segments(mask_row):
    """(start, end, is_model) runs of a response-mask row."""
    out, start = [], 0
    for t in range(1, len(mask_row) + 1):
        if t == len(mask_row) or mask_row[t] != mask_row[start]:
            out.append((start, t, mask_row[start] == 1))
            start = t
    return out


def test_the_transcript_is_model_turns_and_encoded_replies(tok):
    torch.manual_seed(0)
    policy = TransformerPolicy(len(tok), hidden_size=32)
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=3, interaction=Chatty(),
                            max_turns=3)
    ep = sample(env, policy)
    P = ep.prompt_len
    info = ep.turn_info
    assert info is not None and info.num_turns.tolist() == [3] * 8
    assert info.truncated.all()                         # it would have gone on: max_turns
    for b in range(8):
        real = ep.attention_mask[b, P:].tolist()
        n = sum(real)
        assert real == [1] * n + [0] * (len(real) - n)  # one contiguous transcript
        runs = segments(ep.response_mask[b, :n].tolist())
        model_runs = [r for r in runs if r[2]]
        reply_runs = [r for r in runs if not r[2]]
        assert len(model_runs) == 3 and len(reply_runs) == 2
        for (s, e, _), text in zip(reply_runs, info.replies[b], strict=False):
            # the reply's ids are exactly its encoded text, and nothing else is context
            assert ep.input_ids[b, P + s: P + e].tolist() == tok(
                text, add_special_tokens=False)["input_ids"]
        for (s, e, _), text in zip(model_runs, info.turns[b], strict=True):
            ids = ep.input_ids[b, P + s: P + e].tolist()
            assert tok.decode([i for i in ids if i != tok.eos_token_id],
                              skip_special_tokens=True) == text
    assert ep.response_mask[:, -1].sum() >= 0


def test_the_trained_ids_are_the_sampled_ids(tok):
    # The sampler's logprob of each token it drew equals a forward pass's logprob of the token
    # standing at that place in the batch: a changed id (decode then encode) would not match.
    # Some drawn ids (<unk>, <bos>, <pad>) vanish when the text is decoded: they stay trained.
    torch.manual_seed(0)
    policy = TransformerPolicy(len(tok), hidden_size=32)
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=4, interaction=Chatty(),
                            max_turns=3)
    ep = sample(env, policy, n=16)
    mask = ep.response_mask.bool()
    fwd = PlainEngine().forward_response(policy, Sequences(ep.input_ids, ep.attention_mask,
                                                           mask.shape[1]), 1.0)
    assert (fwd.logprobs[mask] - ep.logprobs[mask]).abs().max() < 1e-5
    model_ids = ep.input_ids[:, ep.prompt_len:][mask]
    vanished = torch.isin(model_ids, torch.tensor([tok.unk_token_id, tok.bos_token_id,
                                                   tok.pad_token_id]))
    assert vanished.any()           # ids a decode -> encode round trip would have lost


def test_turn_rewards_sit_on_their_turns_last_model_token(tok):
    torch.manual_seed(0)
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=3, interaction=Chatty(),
                            max_turns=3)
    ep = sample(env, TransformerPolicy(len(tok), hidden_size=32))
    assert ep.token_scores is not None
    final = torch.tensor(count_a(None, ep.responses))
    for b in range(8):
        runs = [r for r in segments(ep.response_mask[b].tolist()) if r[2]]
        lasts = [e - 1 for _, e, _ in runs]
        want = torch.zeros(ep.response_mask.shape[1])
        want[lasts[0]] += 0.5
        want[lasts[1]] += 1.0
        want[lasts[2]] += 1.5 + final[b]     # the last turn's reply reward, then the score
        assert torch.allclose(ep.token_scores[b], want, atol=1e-6)
        assert ep.scores[b].item() == pytest.approx(3.0 + final[b].item(), abs=1e-6)


def test_the_reward_gets_the_turns_and_states(tok):
    seen = {}

    def reward(prompts, responses, turns, states):
        seen.update(turns=turns, states=states, responses=responses)
        return secret_reward(prompts, responses, turns, states)

    torch.manual_seed(0)
    env = TextGenerationEnv(PROMPTS, tok, reward, max_new_tokens=3, interaction=Lookup())
    ep = sample(env, TransformerPolicy(len(tok), hidden_size=32), n=16)
    assert seen["turns"] == ep.turn_info.turns and seen["states"] == ep.turn_info.states
    assert all("secret" in s for s in seen["states"])
    asked = [b for b in range(16) if "?" in ep.turn_info.turns[b][0]]
    assert asked                            # a random policy asks now and then
    for b in asked:                         # the transcript holds the reply as it stands
        assert f"={ep.turn_info.states[b]['secret']}" in seen["responses"][b]
        assert ep.turn_info.num_turns[b] == 2


def test_limits_end_episodes_and_flag_them(tok):
    torch.manual_seed(0)
    policy = TransformerPolicy(len(tok), hidden_size=32)
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=3, interaction=Chatty(),
                            max_turns=5, max_episode_tokens=9)
    ep = sample(env, policy)
    n_real = ep.attention_mask[:, ep.prompt_len:].sum(1)
    assert (n_real <= 9).all() and ep.turn_info.truncated.all()
    assert (ep.turn_info.num_turns < 5).all()
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=3, interaction=Never())
    ep = sample(env, policy)
    assert not ep.turn_info.truncated.any() and (ep.turn_info.num_turns == 1).all()


def test_each_episode_has_its_own_generator_and_resume_continues_it(tok):
    torch.manual_seed(0)
    policy = TransformerPolicy(len(tok), hidden_size=32)

    def env():
        return TextGenerationEnv(PROMPTS, tok, secret_reward, max_new_tokens=3,
                                 interaction=Lookup(), seed=3)

    a = env()
    first = [s["secret"] for s in sample(a, policy).turn_info.states]
    state = a.state_dict()
    second = [s["secret"] for s in sample(a, policy).turn_info.states]
    b = env()
    assert [s["secret"] for s in sample(b, policy).turn_info.states] == first
    c = env()
    c.load_state_dict(state)
    assert [s["secret"] for s in sample(c, policy).turn_info.states] == second
    assert len(set(first + second)) > 3              # not one draw repeated


def test_a_share_of_the_batch_draws_what_the_whole_batch_draws_there(tok):
    """Under torchrun each rank samples its share of the batch: its episodes' generators are
    those of their places in the whole batch, and its count moves on by the whole batch."""
    torch.manual_seed(0)
    policy = TransformerPolicy(len(tok), hidden_size=32)

    def env():
        return TextGenerationEnv(PROMPTS, tok, secret_reward, max_new_tokens=3,
                                 interaction=Lookup(), seed=3)

    def secrets(e, indices, share):
        return [s["secret"] for s in e.sample(
            policy, len(indices), 1.0, torch.device("cpu"), torch.Generator().manual_seed(0),
            indices=indices, share=share).turn_info.states]

    whole, ranks = env(), [env(), env()]
    expected = [secrets(whole, [0, 1, 2, 3, 0, 1, 2, 3], None) for _ in range(2)]
    for it in range(2):
        got = [secrets(r, [0, 1, 2, 3], (4 * k, 8)) for k, r in enumerate(ranks)]
        assert got[0] + got[1] == expected[it]
    assert ranks[1].state_dict()["episodes"] == whole.state_dict()["episodes"] == 16
    with pytest.raises(DataError, match="share"):
        env().sample(policy, 4, 1.0, torch.device("cpu"), indices=[0, 1, 2, 3], share=(6, 8))


class Raises(Interaction):
    def reply(self, prompt, turns, state):
        raise KeyError("boom")


class Wrong(Interaction):
    def reply(self, prompt, turns, state):
        return 42


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    (dict(interaction=Lookup(), max_turns=0), ConfigError, "max_turns"),
    (dict(interaction=object()), ConfigError, "ppolm.Interaction"),
    (dict(interaction=Lookup(), max_episode_tokens=2), ConfigError, "max_episode_tokens"),
    (dict(interaction=Lookup(), prefix_shaping=True), ConfigError, "prefix_shaping"),
])
def test_bad_settings_are_refused(tok, kwargs, error, words):
    with pytest.raises(error, match=words):
        TextGenerationEnv(PROMPTS, tok, secret_reward, max_new_tokens=3, **kwargs)


def test_a_failing_or_wrong_interaction_is_named(tok):
    policy = TransformerPolicy(len(tok), hidden_size=32)
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=3, interaction=Raises())
    with pytest.raises(TrainingError, match=r"Raises.reply raised KeyError.*turn 1.*prompt"):
        sample(env, policy)
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=3, interaction=Wrong())
    with pytest.raises(DataError, match="return a str, a ppolm.Reply"):
        sample(env, policy)


def make_trainer(tok, interaction, engine="plain", kind="transformer", **overrides):
    torch.manual_seed(0)
    policy = (TransformerPolicy(len(tok), hidden_size=32) if kind == "transformer"
              else LSTMPolicy(len(tok), hidden_size=32))
    env = TextGenerationEnv(PROMPTS, tok, count_a, max_new_tokens=4, interaction=interaction,
                            max_turns=3)
    cfg = dict(iterations=1, batch_size=8, minibatch_size=4, ppo_epochs=2, seed=0,
               progress=False, engine=engine, device="cpu")
    return Trainer(policy, env, PPOConfig(**{**cfg, **overrides}))


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
@pytest.mark.parametrize("kind", ["transformer", "lstm"])
@pytest.mark.parametrize("logprobs", ["sampler", "forward"])
def test_first_ratio_is_one_on_multi_turn_rollouts(tok, engine, kind, logprobs):
    trainer = make_trainer(tok, Chatty(), engine, kind, rollout_logprobs=logprobs)
    row = trainer.iterate()
    assert row["turns_mean"] == 3.0
    assert row["ratio_dev_first"] < 1e-5, row["ratio_dev_first"]


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
def test_an_interaction_that_never_replies_changes_nothing(tok, engine):
    plain = make_trainer(tok, None, engine)
    never = make_trainer(tok, Never(), engine)
    a, b = plain.collect()[0], never.collect()[0]
    for name in ("input_ids", "attention_mask", "response_mask", "scores", "ended"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    mask = a.response_mask.bool()
    assert torch.equal(a.logprobs[mask], b.logprobs[mask])
    assert torch.equal(a.hidden[mask], b.hidden[mask])
    assert a.responses == b.responses and b.token_scores is None
    plain, never = make_trainer(tok, None, engine), make_trainer(tok, Never(), engine)
    plain.iterate(), never.iterate()
    for (name, p), q in zip(plain.policy.state_dict().items(),
                            never.policy.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_evaluate_runs_multi_turn_episodes(tok):
    from ppolm import evaluate

    torch.manual_seed(0)
    policy = TransformerPolicy(len(tok), hidden_size=32)
    result = evaluate(policy, tok, PROMPTS, secret_reward, reference=policy, max_new_tokens=3,
                      interaction=Lookup(), max_turns=2, samples_per_prompt=4)
    again = evaluate(policy, tok, PROMPTS, secret_reward, max_new_tokens=3,
                     interaction=Lookup(), max_turns=2, samples_per_prompt=4)
    assert result.n == 16 and result.kl == pytest.approx(0.0, abs=1e-5)
    assert [s.response for s in result.samples] == [s.response for s in again.samples]


def test_a_run_with_an_interaction_that_draws_resumes_exactly(tok):
    import copy

    def trainer(seed=0):
        torch.manual_seed(0)
        env = TextGenerationEnv(PROMPTS, tok, secret_reward, max_new_tokens=3,
                                interaction=Lookup(), max_turns=2)
        return Trainer(TransformerPolicy(len(tok), hidden_size=32), env,
                       PPOConfig(iterations=1, batch_size=8, minibatch_size=4, seed=seed,
                                 progress=False, device="cpu"))

    a = trainer()
    a.train()
    b = trainer(seed=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.config.iterations = b.config.iterations = 3
    ha, hb = a.train(), b.train()
    assert [r["score_mean"] for r in ha[-2:]] == [r["score_mean"] for r in hb]
    assert a.env.state_dict()["episodes"] == b.env.state_dict()["episodes"] == 24
    for p, q in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(p, q)

"""Rewards written TRL's way (``reward(completions, **kwargs)``, every argument by keyword) and
lists of rewards with weights, told apart from ppolm's ``(prompts, responses)`` by their
signature; TRL's conversational format for message-list prompts; missing columns found
before the first rollout; a list of dicts read as table rows."""

from __future__ import annotations

import pytest
import torch

from ppolm import (
    CallableReward,
    PPOConfig,
    RewardFunction,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    WeightedReward,
)
from ppolm.errors import DataError, RewardError
from ppolm.rollout.rewards import CompletionsReward, as_reward

# "<role initial>content" per message, then "j" opens the assistant's turn.
CHAR_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}j{% endif %}")


def sample(env, tok, n=8, **kwargs):
    policy = TransformerPolicy(len(tok), hidden_size=32)
    return env.sample(policy, n, 1.0, torch.device("cpu"), torch.Generator().manual_seed(0),
                      **kwargs)


def count_a(completions, **kwargs):
    return [c.count("a") / 4 for c in completions]


def test_a_trl_reward_gets_prompts_completions_ids_and_columns_by_keyword(tok):
    seen = {}

    def exact(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids,
                    answer=answer, rest=kwargs)
        return [float(c.startswith(a)) for c, a in zip(completions, answer, strict=True)]

    rows = [{"prompt": "abc", "answer": "d"}, {"prompt": "hij", "answer": "a"}]
    env = TextGenerationEnv(rows, tok, exact, max_new_tokens=4)
    assert isinstance(env.reward_fn, CompletionsReward)
    episodes = sample(env, tok)
    assert seen["prompts"] == episodes.prompts and seen["completions"] == episodes.responses
    assert seen["answer"] == [{"abc": "d", "hij": "a"}[p] for p in episodes.prompts]
    assert seen["rest"] == {}
    for text, ids in zip(seen["completions"], seen["ids"], strict=True):
        # the response's own tokens, the end token kept (as TRL's completion_ids)
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert len(ids) <= 4 and tok.pad_token_id not in ids[:-1]
    want = [float(r.startswith(a)) for r, a in zip(episodes.responses, seen["answer"],
                                                    strict=True)]
    assert episodes.scores.tolist() == want


def test_a_trl_reward_taking_only_kwargs_gets_everything(tok):
    seen = {}

    def anything(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    rows = [{"prompt": "abc", "level": 1}, {"prompt": "hij", "level": 2}]
    sample(TextGenerationEnv(rows, tok, anything, max_new_tokens=3), tok)
    assert set(seen) == {"prompts", "completions", "completion_ids", "level"}


def test_a_list_of_rewards_is_a_weighted_sum_logged_by_function_name(tok):
    def starts_with_a(completions, **kwargs):
        return [float(c.startswith("a")) for c in completions]

    def length(prompts, responses):                       # ppolm's way, in the same list
        return [len(r) / 4 for r in responses]

    env = TextGenerationEnv(["abc", "hij"], tok, [count_a, starts_with_a, length],
                            reward_weights=[1.0, 0.5, -2.0], max_new_tokens=4)
    assert isinstance(env.reward_fn, WeightedReward)
    episodes = sample(env, tok)
    r = episodes.responses
    want = [c.count("a") / 4 + 0.5 * c.startswith("a") - 2.0 * len(c) / 4 for c in r]
    assert episodes.scores.tolist() == pytest.approx(want)
    assert set(episodes.reward_parts) == {"count_a", "starts_with_a", "length"}
    assert episodes.reward_parts["length"] == pytest.approx(sum(len(c) / 4 for c in r) / len(r))


def test_chat_prompts_reach_a_trl_reward_in_the_conversational_format(tok):
    tok.chat_template = CHAR_TEMPLATE
    seen = {}

    def conversational(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [float(c[0]["content"].startswith("a")) for c in completions]

    class PlainText(RewardFunction):                       # ppolm's way: the rendered text
        def __call__(self, prompts, responses):
            seen["plain"] = list(prompts)
            return [0.0] * len(responses)

    chats = [[{"role": "system", "content": "ab"}, {"role": "user", "content": "cd"}],
             [{"role": "user", "content": "hij"}]]
    env = TextGenerationEnv(chats, tok, [conversational, PlainText()], max_new_tokens=4)
    episodes = sample(env, tok)
    assert seen["prompts"] == [chats[0] if p == "sabucdj" else chats[1]
                               for p in episodes.prompts]
    assert seen["completions"] == [[{"role": "assistant", "content": r}]
                                   for r in episodes.responses]
    assert seen["plain"] == episodes.prompts and set(seen["plain"]) <= {"sabucdj", "uhijj"}

    # string prompts stay strings for a TRL reward, also wrapped by the chat template
    env = TextGenerationEnv(["cd", "hij"], tok, conversational, max_new_tokens=4,
                            chat_template=True)
    with pytest.raises(RewardError, match="AttributeError|TypeError|string indices"):
        sample(env, tok)          # c[0]["content"] on a string: it got the plain text


def test_prefix_shaping_gives_each_prefix_its_own_ids(tok):
    calls = []

    def by_ids(completions, completion_ids, **kwargs):
        calls.append((list(completions), [list(i) for i in completion_ids]))
        return [float(len(i)) for i in completion_ids]

    env = TextGenerationEnv(["abc", "hij"], tok, by_ids, max_new_tokens=4, prefix_shaping=True,
                            ignore_eos=True)
    sample(env, tok, n=4)
    prefixes, whole = calls
    for text, ids in zip(*prefixes, strict=True):
        assert tok.decode(ids, skip_special_tokens=True) == text and 1 <= len(ids) < 4
    assert all(len(ids) == 4 for ids in whole[1])


def test_missing_columns_are_found_before_the_first_rollout(tok):
    rows = [{"prompt": "abc", "answer": "d"}]

    def wants_target(prompts, responses, target):
        return [0.0] * len(responses)

    def trl_wants_target(completions, target, **kwargs):
        return [0.0] * len(completions)

    for reward in (CallableReward(wants_target), trl_wants_target,
                   WeightedReward({"t": (CallableReward(wants_target), 1.0)}),
                   [count_a, trl_wants_target]):
        with pytest.raises(RewardError, match=r"needs \['target'\].*columns: \['answer'\]"):
            TextGenerationEnv(rows, tok, reward, max_new_tokens=2)


def test_bad_reward_lists_and_weights_are_refused(tok):
    with pytest.raises(RewardError, match="one finite number per reward function"):
        TextGenerationEnv(["abc"], tok, [count_a, count_a], reward_weights=[1.0])
    with pytest.raises(RewardError, match="go with a list"):
        TextGenerationEnv(["abc"], tok, count_a, reward_weights=[1.0])
    with pytest.raises(RewardError, match="empty list"):
        as_reward([])

    def only_completions(completions):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"does not accept the prompts' other columns.*kwargs"):
        TextGenerationEnv([{"prompt": "abc", "answer": "d"}], tok, only_completions)

    def returns_none(completions, **kwargs):
        return [None] * len(completions)

    env = TextGenerationEnv(["abc"], tok, returns_none, max_new_tokens=2)
    with pytest.raises(RewardError, match="TRL's None"):
        sample(env, tok, n=2)


def test_a_list_of_dicts_is_read_as_table_rows_or_refused_with_the_fix(tok):
    env = TextGenerationEnv([{"prompt": "abc", "n": 1}, {"prompt": "hij", "n": 2}], tok,
                            lambda prompts, responses, n: [float(v) for v in n])
    assert env.prompts == ["abc", "hij"] and env.columns == {"n": [1, 2]}
    with pytest.raises(DataError, match=r"row 1 has no 'prompt' key.*rename 'question'.*"
                                        r"Dataset.from_list"):
        TextGenerationEnv([{"prompt": "abc"}, {"question": "hij"}], tok, count_a)
    with pytest.raises(DataError, match=r"ONE conversation.*prompts=\[messages\]"):
        TextGenerationEnv([{"role": "user", "content": "abc"}], tok, count_a)


def test_the_missing_prompt_column_error_names_a_real_column(tok):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"id": [1], "text": ["abc"]})
    with pytest.raises(DataError, match=r"columns: \['id', 'text'\].*rename_column\('text', "):
        TextGenerationEnv(data, tok, count_a)
    data = datasets.Dataset.from_dict({"q": ["abc"], "a": ["d"]})
    with pytest.raises(DataError, match=r"rename_column\('q', 'prompt'\)"):
        TextGenerationEnv(data, tok, count_a)


def test_a_trainer_learns_from_a_list_of_trl_rewards(tok):
    def ends_soon(completions, **kwargs):
        return [-len(c) / 8 for c in completions]

    env = TextGenerationEnv(["abc", "hij"], tok, [count_a, ends_soon], reward_weights=[1.0, 0.1],
                            max_new_tokens=4)
    config = PPOConfig(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=1,
                       progress=False, health_checks=False)
    history = Trainer(TransformerPolicy(len(tok), hidden_size=32), env, config).train()
    assert {"reward/count_a", "reward/ends_soon"} <= set(history[-1])

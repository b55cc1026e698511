"""ToolInteraction: schemas from type hints and docstrings, the <tool_call> parser, each kind of
call (valid, malformed, unknown, wrong arguments, raising, hanging), the schemas in the prompt
(a template that renders tools, and SmolLM2's, which does not), and bad tools refused."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ppolm import ConfigError, TextGenerationEnv, ToolInteraction, char_tokenizer
from ppolm.rollout.tools import MalformedCall, ToolCall, parse_hermes, tool_schema


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: the dividend
        b: the divisor
    """
    return a / b


def sleepy(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "awake"


def undocumented(x: int) -> int:
    return x


def call(name, **arguments):
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def test_schemas_come_from_type_hints_and_docstrings():
    schema = tool_schema(add)
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "add" and fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"] == {
        "a": {"type": "integer", "description": "the first number"},
        "b": {"type": "integer", "description": "the second number"}}
    assert fn["parameters"]["required"] == ["a", "b"]
    with pytest.raises(ConfigError, match="undocumented.*docstring"):
        tool_schema(undocumented)


@pytest.mark.parametrize(("tools", "words"), [
    ([], "non-empty list"), ("add", "non-empty list"), ([add, 3], "not callables"),
    ([add, add], "share a name"), ([undocumented], "docstring")])
def test_bad_tools_are_refused(tools, words):
    with pytest.raises(ConfigError, match=words):
        ToolInteraction(tools=tools)


def test_the_parser_reads_hermes_calls():
    text = "Let me compute. " + call("add", a=2, b=3) + " and " + call("divide", a=1, b=4)
    assert parse_hermes(text) == [ToolCall("add", {"a": 2, "b": 3}),
                                  ToolCall("divide", {"a": 1, "b": 4})]
    as_string = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"}</tool_call>'
    assert parse_hermes(as_string) == [ToolCall("add", {"a": 1, "b": 1})]
    assert parse_hermes("no call here") == []
    for bad in ["<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                '<tool_call>{"name": "add"', '<tool_call>{"name": "add", "arguments": 3}'
                                             '</tool_call>']:
        with pytest.raises(MalformedCall):
            parse_hermes(bad)


def test_each_kind_of_call_gets_its_reply():
    tools = ToolInteraction(tools=[add, divide, sleepy], timeout=0.3, max_calls=5)
    state = tools.reset("p", None)

    def reply(text):
        out = tools.reply("p", ["earlier", text], state)
        return None if out is None else out.text

    assert tools.reply_role == "tool"
    assert reply(call("add", a=2, b=3)) == "5"
    assert reply("The answer is 5.") is None                       # no call: the episode ends
    assert reply(call("mul", a=2, b=3)).startswith("error: unknown tool 'mul'")
    assert reply("<tool_call>{oops}</tool_call>").startswith("error: malformed call")
    assert reply(call("add", a=2, c=3)).startswith("error: TypeError")      # wrong arguments
    assert reply(call("divide", a=1, b=0)) == "error: ZeroDivisionError: division by zero"
    t0 = time.perf_counter()
    assert reply(call("sleepy", seconds=30)) == "error: timed out after 0.3 s"
    assert time.perf_counter() - t0 < 5                            # training goes on
    assert tools.tool_errors(state) == 5
    assert reply(call("add", a=1, b=1)).startswith("error: too many tool calls")
    both = reply(call("add", a=1, b=2) + call("mul", a=1, b=2))
    assert both.startswith("error: too many tool calls")


def test_several_calls_in_one_turn_get_one_reply():
    tools = ToolInteraction(tools=[add, divide])
    out = tools.reply("p", [call("add", a=1, b=2) + call("divide", a=1, b=2)], tools.reset("p",
                                                                                          None))
    assert out is not None and out.text == "3\n0.5"


HERMES_LIKE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="module")
def smol_folder():
    pytest.importorskip("gguf")
    from ppolm.policies import pretrained

    try:
        return pretrained.dequantize_gguf(pretrained.smollm2_gguf_file())
    except Exception as e:  # the model file is an optional install
        pytest.skip(f"SmolLM2 is not installed: {e}")


@pytest.fixture
def smol_tok(smol_folder):
    from ppolm.policies import pretrained

    return pretrained.load_tokenizer(smol_folder)     # a fresh one: tests change its template


def reward(prompts, responses):
    return [0.0] * len(responses)


def test_the_schemas_reach_the_prompt(smol_tok):
    messages = [[{"role": "user", "content": "What is 12 * 34?"}]]
    tools = ToolInteraction(tools=[add])
    smol_tok.chat_template = HERMES_LIKE            # a template that renders tools itself
    env = TextGenerationEnv(messages, smol_tok, reward, max_new_tokens=4, interaction=tools)
    assert env.prompts[0].startswith("<|im_start|>system\nTools:")
    assert json.dumps(tool_schema(add)) in env.prompts[0]       # as the template writes it
    assert "You may call" not in env.prompts[0]


def test_a_template_without_tools_gets_them_in_the_system_message(smol_tok):
    tok = smol_tok
    messages = [[{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "What is 12 * 34?"}]]
    env = TextGenerationEnv(messages, tok, reward, max_new_tokens=4,
                            interaction=ToolInteraction(tools=[add]))
    text = env.prompts[0]
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call one or more functions")
    assert json.dumps(tool_schema(add)) in text and "<tool_call>" in text
    assert text.endswith("<|im_start|>user\nWhat is 12 * 34?<|im_end|>\n<|im_start|>assistant\n")


def test_tools_run_in_plain_episodes():
    # A character-level model cannot write JSON, but the machinery needs no chat template.
    tok = char_tokenizer("abc<>{}\":, 0123456789_/lnmotea")
    tools = ToolInteraction(tools=[add])
    env = TextGenerationEnv(["a"], tok, reward, max_new_tokens=3, interaction=tools)
    from ppolm import TransformerPolicy

    ep = env.sample(TransformerPolicy(len(tok), hidden_size=16), 4, 1.0, torch.device("cpu"),
                    torch.Generator().manual_seed(0), record=True)
    assert ep.turn_info is not None and ep.turn_info.tool_errors.shape == (4,)

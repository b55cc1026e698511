"""The pieces of examples/tools_smollm2.py that need no model: the CALC call parser, the
reward on the model's last turn, the disjoint question splits (the training run itself is a
demonstration, docs/experiments.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ppolm import ToolInteraction
from ppolm.rollout.tools import MalformedCall, ToolCall

PATH = Path(__file__).resolve().parents[1] / "examples" / "tools_smollm2.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("tools_smollm2", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calc_lines_are_multiply_calls(demo):
    assert demo.parse_calc("CALC: 23*47") == [ToolCall("multiply", {"a": 23, "b": 47})]
    # what follows the product on the line is ignored
    assert demo.parse_calc("CALC: 66 * 32 = 178") == [ToolCall("multiply", {"a": 66, "b": 32})]
    assert demo.parse_calc("23 * 47 = 1081") == []
    with pytest.raises(MalformedCall):
        demo.parse_calc("CALC: 93.77")


def test_the_tool_interaction_answers_a_calc_line(demo):
    tools = ToolInteraction(tools=[demo.multiply], parser=demo.parse_calc)
    state = tools.reset("", None)
    assert tools.reply("", ["CALC: 23*47"], state).text == "23 * 47 = 1081"
    assert tools.reply("", ["CALC: 2.5*3"], state).text.startswith("error: malformed call")
    assert tools.reply("", ["23 * 47 = 1081"], state) is None
    assert state == {"tool_calls": 1, "tool_errors": 1}


def test_the_reward_reads_the_last_turn_for_the_last_question(demo):
    prompt = "What is 12 * 34? ... What is 23 * 47?"
    turns = [["CALC: 23*47", "23 * 47 = 1081"], ["CALC: 23*47", "1081 is it"],
             ["23 * 47 = 1080"], ["CALC: 23*47"], ["12 * 34 = 408"]]
    assert demo.product_reward([prompt] * 5, [""] * 5, turns) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # without an interaction the response is the one turn
    assert demo.product_reward([prompt], ["= 1,081"]) == [1.0]


def test_held_out_questions_are_not_trained_on(demo):
    train, held_out = set(demo.questions("train")), set(demo.questions("eval"))
    assert len(train) == len(held_out) == 1000 and not train & held_out
    assert all(q.startswith("What is ") and q.endswith("?") for q in held_out)

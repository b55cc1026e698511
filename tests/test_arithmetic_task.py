"""The verifiable arithmetic reward and its prompts."""

from __future__ import annotations

import pytest

from ppolm.rollout.tasks import ArithmeticReward, arithmetic_prompts


def test_the_reward_checks_the_answer_the_prompt_asks_for():
    chat = "<|im_start|>user\nWhat is 7 + 5? Reply with the number only.<|im_end|>\n"
    prompts = [chat] * 7
    responses = ["12", "12.", "7 + 5 = 12", "The answer is 12, of course", "7 + 5 = 13",
                 "7", "no idea"]
    assert ArithmeticReward()(prompts, responses) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="What is A"):
        ArithmeticReward()(["tell me a story"], ["12"])


def test_train_and_eval_questions_are_fixed_and_disjoint():
    train, held_out = arithmetic_prompts("train", 1000), arithmetic_prompts("eval", 1000)
    assert len(train) == len(held_out) == 72                   # 12 x 12 pairs, halved
    assert not set(train) & set(held_out)
    assert arithmetic_prompts("train", 5) == train[:5]         # the same list every call
    assert arithmetic_prompts("eval", 3, low=20, high=21)[0].startswith("What is 2")

"""SentimentReward (VADER) and its registration for YAML configs."""

from __future__ import annotations

import importlib.util

import pytest

from ppolm import SentimentReward
from ppolm.errors import RewardError
from ppolm.rollout.tasks import movie_review_prompts
from ppolm.run import RunSpec, load_reward

needs_vader = pytest.mark.skipif(importlib.util.find_spec("vaderSentiment") is None,
                                 reason="needs: pip install vaderSentiment")


@needs_vader
def test_compound_score_of_the_response_only():
    reward = SentimentReward()
    scores = reward(["Review a terrible film."] * 3,
                    ["A wonderful, moving and beautifully acted film.",
                     "A dull, tedious and awful mess.", ""])
    assert scores[0] > 0.8 and scores[1] < -0.6 and scores[2] == 0.0
    assert all(-1.0 <= s <= 1.0 for s in scores)
    negative = SentimentReward(target="negative")
    assert negative([""], ["A wonderful film."]) == [-reward([""], ["A wonderful film."])[0]]
    with pytest.raises(RewardError, match="positive"):
        SentimentReward(target="neutral")


@needs_vader
def test_sentiment_is_a_builtin_reward_name_and_smollm2_a_model_kind():
    assert isinstance(load_reward("sentiment", {}), SentimentReward)
    spec = RunSpec.from_dict({"task": None, "prompts": "p.txt", "reward": "sentiment",
                              "model": {"kind": "smollm2", "trainable_layers": 10},
                              "env": {"chat_template": True}})
    assert spec.model.kind == "smollm2" and spec.env.chat_template


def test_movie_review_prompts_are_distinct_and_the_eval_split_held_out():
    train, held_out = movie_review_prompts("train"), movie_review_prompts("eval")
    assert len(train) >= 200 and len(held_out) >= 50
    assert len(set(train)) == len(train) and not set(train) & set(held_out)
    assert all("two-sentence" in p or "two sentences" in p for p in train + held_out)

"""What a TRL user reaches for on the Trainer: ``trainer.model`` (the transformers model, a
PeftModel with LoRA) and ``eval_dataset=`` (an EvalCallback made for you, the dataset's
columns reaching the reward as in training)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from ppolm import EvalCallback, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, TransformerPolicy

CONFIG = dict(iterations=2, batch_size=4, minibatch_size=4, ppo_epochs=1, progress=False,
              health_checks=False, engine="plain")


def exact(prompts, responses, answer):
    return [float(r.startswith(a)) for r, a in zip(responses, answer, strict=True)]


def test_trainer_model_is_the_transformers_model(tok):
    from transformers import PreTrainedModel

    torch.manual_seed(0)
    env = TextGenerationEnv(["abc"], tok, lambda p, r: [0.0] * len(r), max_new_tokens=2)
    policy = HFPolicy(tiny_llama(len(tok)))
    trainer = Trainer(policy, env, PPOConfig(**CONFIG))
    assert isinstance(trainer.model, PreTrainedModel) and trainer.model is policy.lm
    peft = pytest.importorskip("peft")
    lora = HFPolicy(tiny_llama(len(tok)), peft_config=peft.LoraConfig(r=2,
                                                                      target_modules=["q_proj"]))
    assert isinstance(Trainer(lora, env, PPOConfig(**CONFIG)).model, peft.PeftModel)
    small = TransformerPolicy(len(tok), hidden_size=32)
    assert Trainer(small, env, PPOConfig(**CONFIG)).model is small


def test_eval_dataset_evaluates_with_its_columns():
    datasets = pytest.importorskip("datasets")
    from ppolm import char_tokenizer

    tok = char_tokenizer("abcdefghij")
    train = datasets.Dataset.from_dict({"prompt": ["abc", "hij"], "answer": ["d", "a"]})
    held_out = datasets.Dataset.from_dict({"prompt": ["cde", "fgh"], "answer": ["f", "i"]})
    env = TextGenerationEnv(train, tok, exact, max_new_tokens=2)
    torch.manual_seed(0)
    trainer = Trainer(TransformerPolicy(len(tok), hidden_size=32), env, PPOConfig(**CONFIG),
                      eval_dataset=held_out)
    assert isinstance(trainer.callbacks.callbacks[0], EvalCallback)
    history = trainer.train()
    assert "eval/score_mean" in history[-1] and "eval/score_mean" not in history[0]
    (result,) = trainer.callbacks.callbacks[0].results.values()
    assert sorted({s.prompt for s in result.samples}) == ["cde", "fgh"]
    assert result.reward_mean == pytest.approx(sum(
        exact([s.prompt], [s.response], [{"cde": "f", "fgh": "i"}[s.prompt]])[0]
        for s in result.samples) / len(result.samples))

"""trainer.save_model: a folder that AutoModelForCausalLM, AutoTokenizer and
pipeline("text-generation") load, giving the trained policy's logits (LoRA merged, or the
adapters alone through peft), with the value head beside it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, ValueHead
from ppolm.checkpoint.export import load_value_head
from ppolm.errors import ConfigError

peft = pytest.importorskip("peft")

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


def trained(tok, lora=True):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    policy = HFPolicy(tiny_llama(len(tok)), peft_config=cfg if lora else None)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=6)
    trainer = Trainer(policy, env, PPOConfig(iterations=2, batch_size=8, minibatch_size=4,
                                             learning_rate=1e-2, progress=False,
                                             engine="plain"))
    trainer.train()
    return trainer


def policy_logits(policy, ids):
    with torch.no_grad():
        return policy(ids, torch.ones_like(ids)).logits                 # (1, L, V)


@pytest.mark.parametrize("lora", [True, False])
def test_saved_model_loads_with_transformers_and_gives_the_policys_logits(tok, tmp_path, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    trainer = trained(tok, lora)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    folder = trainer.save_model(tmp_path / "out")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "value_head.safetensors"} <= names
    assert "adapter_config.json" not in names
    # exporting changed nothing in the policy (the merge happened on a copy)
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    ids = loaded_tok("abcde", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok("abcde", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        theirs = model(ids).logits
    assert (theirs - policy_logits(trainer.policy, ids)).abs().max() < 1e-5
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    out = generator("abc", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("abc")
    head = load_value_head(folder)
    assert torch.equal(head.linear.weight, trainer.value_head.linear.weight)


def test_adapters_alone_load_with_peft(tok, tmp_path):
    trainer = trained(tok)
    folder = trainer.save_model(tmp_path / "adapters", merge=False)
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "generation_config.json"} <= names
    assert "model.safetensors" not in names
    torch.manual_seed(0)
    base = tiny_llama(len(tok))               # the same random base (same seed)
    model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    ids = tok("abcde", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    assert (theirs - policy_logits(trainer.policy, ids)).abs().max() < 1e-5


def test_a_policy_that_is_no_transformers_model_is_refused(tmp_path):
    from conftest import toy_trainer

    trainer = toy_trainer(tmp_path / "run")
    with pytest.raises(ConfigError, match="needs an HFPolicy"):
        trainer.save_model(tmp_path / "out")


def test_a_separate_critic_is_saved_beside_the_policy(tok, tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    policy = HFPolicy(tiny_llama(len(tok)), peft_config=cfg)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=4)
    trainer = Trainer(policy, env, PPOConfig(iterations=1, batch_size=8, minibatch_size=8,
                                             progress=False, engine="plain"),
                      value_head=ValueHead.separate(policy))
    trainer.train()
    folder = trainer.save_model(tmp_path / "out")
    # the critic's trunk: its own adapters (on the same base model as the policy's)
    assert (folder / "critic" / "adapter_model.safetensors").is_file()
    assert torch.equal(load_value_head(folder).linear.bias, trainer.value_head.linear.bias)

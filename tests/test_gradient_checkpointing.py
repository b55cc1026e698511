"""Gradient checkpointing (``gradient_checkpointing=True``): fewer activations kept for backward,
the same gradients, and dropout still off in the update."""

from __future__ import annotations

import pytest
import torch

from conftest import ALPHABET
from ppolm import PPOConfig, TextGenerationEnv, Trainer, char_tokenizer
from ppolm.engines.base import OptimizerSettings, Sequences
from ppolm.engines.plain import PlainEngine
from ppolm.errors import ConfigError
from ppolm.policies.hf import HFPolicy
from ppolm.rollout.rewards import CallableReward

PROMPTS = ["ab", "ba", "abc", "cab"]


def llama(dropout: float = 0.0) -> HFPolicy:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(char_tokenizer(ALPHABET)), hidden_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=64,
                      attention_dropout=dropout, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return HFPolicy(LlamaForCausalLM(cfg).eval())


def backward_pass(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """One backward through the policy's logprobs inside the engine's update; returns the
    bytes autograd kept for backward and the gradients."""
    policy = llama()
    engine = PlainEngine("cpu", gradient_checkpointing=checkpointing)
    engine.setup(policy, None, policy, OptimizerSettings(1e-3))
    ids = torch.randint(3, 10, (8, 24), generator=torch.Generator().manual_seed(0))
    seqs = Sequences(ids, torch.ones_like(ids), 12)
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with engine.update(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.zero_grad()
        fwd = engine.forward_response(policy, seqs, 1.0)
        fwd.logprobs.sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    return kept, grads


def test_checkpointing_keeps_fewer_activations_and_gives_the_same_gradients():
    kept_plain, grads_plain = backward_pass(False)
    kept_ckpt, grads_ckpt = backward_pass(True)
    assert kept_ckpt < 0.5 * kept_plain, (kept_ckpt, kept_plain)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_runs_in_training_mode_with_dropout_still_off():
    """The checkpointed layers alone are in training mode during the update: a model with
    attention dropout 0.5 gives the update the rollout's logprobs (first ratio 1)."""
    tok = char_tokenizer(ALPHABET)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(lambda p, r: [len(x) / 4 for x in r]),
                            max_new_tokens=4)
    trainer = Trainer(llama(dropout=0.5), env, PPOConfig(
        iterations=1, batch_size=8, minibatch_size=8, engine="plain", progress=False,
        gradient_checkpointing=True, rollout_logprobs="forward"))
    layers = trainer.engine.checkpointed_layers
    assert len(layers) == 4
    seen = []
    layers[0].register_forward_hook(lambda m, a, o: seen.append(m.training))
    row = trainer.iterate()
    assert row["ratio_dev_first"] < 1e-6
    assert True in seen                      # the update's forward ran them checkpointed
    assert not any(m.training for m in trainer.policy.modules())          # all off after


def test_checkpointing_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        PPOConfig(gradient_checkpointing=True, engine="fast_cpu")
    from ppolm import TransformerPolicy
    with pytest.raises(ConfigError, match="does not support gradient_checkpointing"):
        TransformerPolicy(10).enable_gradient_checkpointing()

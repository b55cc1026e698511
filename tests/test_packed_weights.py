"""Decoding over weights packed for oneDNN (fast CPU engine, ``packed_weights``): a packed linear
map equals ``F.linear`` to float32 rounding (bf16: bitwise as autocast computes it); the decoder
over packed weights gives the tokens of the model's own cache and its logprobs and states to
float32 rounding, on Llama, Qwen2 (biased q/k/v) and Mistral; adapters stay unpacked; a training
run with and without packing gives the same numbers to float32 rounding; the engine's switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppolm import HFPolicy
from ppolm.engines.fast_cpu import FastCPUSettings, packed
from ppolm.engines.fast_cpu.attention import cpu_bf16_supported
from ppolm.engines.fast_cpu.decoding import StaticDecoder, decodes_like
from ppolm.engines.fast_cpu.views import view_of
from test_static_decoding import sample, short_run, tiny

pytestmark = pytest.mark.skipif(not packed.available(), reason="torch without oneDNN")


def test_a_packed_linear_map_equals_f_linear_to_float32_rounding():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 48, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(2, 5, 48, generator=gen)                       # any leading shape
    ours, theirs = packed.PackedLinear(weight, bias)(x), F.linear(x, weight, bias)
    assert ours.shape == theirs.shape == (2, 5, 96) and ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, F.linear(x, weight), atol=1e-3)      # the bias is added
    unpacked = packed.linear(weight, None, pack=False)
    assert not isinstance(unpacked, packed.PackedLinear)
    assert torch.equal(unpacked(x), F.linear(x, weight))
    assert not packed.packs(weight.double()) and not packed.packs(bias)


@pytest.mark.skipif(not cpu_bf16_supported(), reason="no bf16 on this CPU")
def test_a_packed_bf16_map_equals_autocast_bitwise():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 32, generator=gen), torch.randn(7, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = F.linear(x, weight)
    ours = packed.PackedLinear(weight.bfloat16(), None)(x)        # the input cast as autocast
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_models_tokens_and_its_logprobs_and_states_to_float32_rounding(family):
    policy = HFPolicy(tiny(family))
    view = view_of(policy)
    assert decodes_like(view, "cpu", pack=True)
    decoder = StaticDecoder(view, pack=True)
    assert isinstance(decoder.qkv[0].product, packed.PackedLinear)
    assert isinstance(decoder.vocab.product, packed.PackedLinear)
    theirs, ours = sample(policy, None), sample(policy, decoder)
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.mask, theirs.mask)
    assert torch.allclose(ours.logprobs, theirs.logprobs, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours.hidden, theirs.hidden, rtol=1e-4, atol=1e-5)


def test_adapters_are_not_packed():
    from peft import LoraConfig

    policy = HFPolicy(tiny("llama"), peft_config=LoraConfig(
        r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    decoder = StaticDecoder(view_of(policy), pack=True)
    assert decoder.qkv[0].product is None and decoder.mlp[0].down.product is None
    assert isinstance(decoder.mlp[0].gate_up.product, packed.PackedLinear)
    theirs, ours = sample(policy, None), sample(policy, decoder)
    assert torch.equal(ours.tokens, theirs.tokens)
    assert torch.allclose(ours.logprobs, theirs.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_bf16_supported(), reason="no bf16 on this CPU")
def test_under_bf16_autocast_packing_changes_no_bit():
    policy = HFPolicy(tiny("llama"))
    view = view_of(policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = sample(policy, StaticDecoder(view, pack=False))
        ours = sample(policy, StaticDecoder(view, pack=True))
    assert torch.equal(ours.tokens, plain.tokens) and torch.equal(ours.logprobs, plain.logprobs)


def test_a_training_run_with_and_without_packing(tok):
    """packed_weights on (the default) and off: the same run to float32 rounding."""
    histories, trunks = [], []
    for pack in (True, False):
        trainer = short_run(tok, packed_weights=pack)
        trunk = trainer.engine.sampling_trunk(trainer.policy)
        assert isinstance(trunk, StaticDecoder)
        trunks.append(trunk.vocab.product)
        histories.append(trainer.train())
    assert isinstance(trunks[0], packed.PackedLinear)
    assert not isinstance(trunks[1], packed.PackedLinear)
    for a, b in zip(*histories, strict=True):
        assert a["reward_mean"] == b["reward_mean"]                     # the same tokens
        for key in ("loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert FastCPUSettings().packed_weights

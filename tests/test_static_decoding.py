"""Decoding over a preallocated KV cache (fast CPU engine, ``static_decoding``): the same tokens,
logprobs and states as the model's own cache, bit for bit, on Llama, Qwen2 (biased q/k/v) and
Mistral; the frozen layers' output recorded as ``BottomRecorder`` records it; the buffer
growing past its first size; a multi-token feed; LoRA adapters; the switch and the probe."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from ppolm import HFPolicy, PPOConfig, TextGenerationEnv, Trainer
from ppolm.engines.fast_cpu import FastCPUEngine, FastCPUSettings
from ppolm.engines.fast_cpu.decoding import GROWTH, StaticDecoder, decodes_like, supported
from ppolm.engines.fast_cpu.frozen import BottomRecorder
from ppolm.engines.fast_cpu.views import view_of
from ppolm.rollout.rewards import CallableReward
from ppolm.rollout.sampling import generate

VOCAB = 40


def tiny(family: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama(VOCAB)
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    if family == "qwen2":                       # q, k and v carry biases
        model = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False))
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
        return model.eval()
    return MistralForCausalLM(MistralConfig(**shape, sliding_window=None)).eval()


def prompts(batch: int = 6, length: int = 7):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                          # left-padded rows
    mask[2, :5] = 0
    return ids, mask


def sample(policy, trunk, new_tokens=12, eos=(5, 6)):
    ids, mask = prompts()
    return generate(policy, ids, mask, new_tokens, eos_token_id=list(eos), pad_token_id=0,
                    generator=torch.Generator().manual_seed(2), record=True, trunk=trunk)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_same_tokens_logprobs_and_states_as_the_models_own_cache(family):
    policy = HFPolicy(tiny(family))
    view = view_of(policy)
    assert supported(view) and decodes_like(view, "cpu")
    theirs = sample(policy, None)
    ours = sample(policy, StaticDecoder(view))
    assert theirs.mask[:, -1].any() and not theirs.mask.all()     # rows ended at different steps
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.logprobs, theirs.logprobs)
    assert torch.equal(ours.hidden, theirs.hidden)


def test_the_buffer_grows_past_its_first_size():
    policy = HFPolicy(tiny("qwen2"))
    decoder = StaticDecoder(view_of(policy))
    theirs = sample(policy, None, new_tokens=GROWTH + 20, eos=())
    ours = sample(policy, decoder, new_tokens=GROWTH + 20, eos=())
    assert ours.tokens.shape[1] == GROWTH + 20                    # past the first buffer
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.hidden, theirs.hidden)


def test_the_frozen_layers_output_is_recorded_as_the_recorder_records_it():
    policy = HFPolicy(tiny("llama"))
    view = view_of(policy)
    recorder, decoder = BottomRecorder(view, 1), StaticDecoder(view, 1)
    a, b = sample(policy, recorder), sample(policy, decoder)
    assert torch.equal(a.tokens, b.tokens)
    length = prompts()[0].shape[1] + a.tokens.shape[1]
    assert torch.equal(recorder.bottom(length), decoder.bottom(length))


@torch.no_grad()
def test_a_multi_token_feed_over_the_cache_gives_the_models_states():
    """A continuation feeds several tokens at once (causal among them, rows with holes)."""
    policy = HFPolicy(tiny("mistral"))
    decoder = StaticDecoder(view_of(policy))
    ids, mask = prompts()
    _, cache = decoder(ids, mask, None)
    _, dynamic = policy.trunk(ids, mask, use_cache=True)
    new = torch.randint(3, VOCAB, (6, 3))
    fed = torch.ones(6, 3, dtype=torch.long)
    fed[1, 0] = 0                                               # a hole in a row's feed
    mask = torch.cat([mask, fed], dim=1)
    ours, _ = decoder(new, mask, cache)
    theirs, _ = policy.trunk(new, mask, cache=dynamic, use_cache=True)
    assert torch.allclose(ours[fed.bool()], theirs[fed.bool()], rtol=1e-5, atol=1e-6)


def test_lora_adapters_are_called_as_they_are():
    from peft import LoraConfig

    policy = HFPolicy(tiny("llama"), peft_config=LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    view = view_of(policy)
    assert decodes_like(view, "cpu")
    decoder = StaticDecoder(view)
    assert decoder.qkv[0].product is None and decoder.mlp[0].gate_up.product is None
    theirs, ours = sample(policy, None), sample(policy, decoder)
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.hidden, theirs.hidden)


def test_models_of_other_families_keep_their_own_cache():
    gpt2 = view_of(HFPolicy(tiny_gpt2(VOCAB)))
    assert not supported(gpt2)
    engine = FastCPUEngine()
    assert engine.static_decodes(gpt2.policy) is False
    assert engine.sampling_trunk(gpt2.policy) is None


def short_run(tok, **settings) -> Trainer:
    """Two iterations of a tiny Llama on the fast engine with ``settings`` (not yet trained)."""
    torch.manual_seed(0)
    policy = HFPolicy(tiny_llama(len(tok)))
    env = TextGenerationEnv(["ab", "cde", "f"], tok, CallableReward(
        lambda ps, rs: [r.count("a") / 6 for r in rs]), max_new_tokens=6, seed=0)
    trainer = Trainer(policy, env, PPOConfig(
        iterations=2, batch_size=8, minibatch_size=4, seed=0, progress=False,
        engine="fast_cpu", **settings))
    assert isinstance(trainer.engine, FastCPUEngine)
    return trainer


def test_the_switch_and_a_training_run_with_and_without_it(tok):
    """static_decoding on (the default; over the weights as stored, every row prefilled) and
    off: the same run, the same numbers."""
    histories = []
    for static in (True, False):
        trainer = short_run(tok, static_decoding=static, packed_weights=False,
                            prefill_once=False)
        trunk = trainer.engine.sampling_trunk(trainer.policy)
        assert isinstance(trunk, StaticDecoder) is static
        histories.append(trainer.train())
    for a, b in zip(*histories, strict=True):
        for key in ("loss", "kl", "reward_mean", "grad_norm"):
            assert a[key] == b[key], key
    assert FastCPUSettings().static_decoding


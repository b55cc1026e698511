"""A prompt that fills several rows of a rollout is run once before decoding (fast CPU engine,
``prefill_once``): which rows are run and which copy them; the decoder's states, cache and
frozen-layer output equal those of a prefill over every row; sampled tokens and logprobs equal
the model's own cache; a training run with repeated prompts the same with and without it."""

from __future__ import annotations

import pytest
import torch

from ppolm.engines.fast_cpu import FastCPUSettings
from ppolm.engines.fast_cpu.decoding import StaticDecoder, distinct_rows
from ppolm.engines.fast_cpu.views import view_of
from ppolm.policies.hf import HFPolicy
from ppolm.rollout.sampling import generate
from test_static_decoding import VOCAB, short_run, tiny


def repeated_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Six rows, three prompts: rows 0, 2, 5 alike; 1 and 4 alike; row 3 has row 1's tokens
    but another padding, so it is a prompt of its own. Shapes: (6, 7) each."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, VOCAB, (2, 7), generator=gen)
    ids = torch.stack([a, b, a, b, b, a])
    mask = torch.ones_like(ids)
    mask[[0, 2, 5], :2] = 0                                     # left-padded
    mask[3, :4] = 0
    return ids, mask


def test_the_rows_run_and_the_rows_that_copy_them():
    ids, mask = repeated_prompts()
    first, copies = distinct_rows(ids, mask)
    assert first.tolist() == [0, 1, 3]                           # first of each, in order
    assert copies.tolist() == [0, 1, 0, 2, 1, 0]
    assert torch.equal(ids[first][copies], ids) and torch.equal(mask[first][copies], mask)
    assert distinct_rows(ids[:2], mask[:2]) is None             # nothing repeats


@torch.no_grad()
def test_the_decoders_states_cache_and_frozen_output_equal_a_prefill_of_every_row():
    view = view_of(HFPolicy(tiny("qwen2")))
    ids, mask = repeated_prompts()
    once, every = StaticDecoder(view, 1, prefill_once=True), StaticDecoder(view, 1)
    (h1, kv1), (h2, kv2) = once(ids, mask, None), every(ids, mask, None)
    real = mask.bool()
    assert torch.allclose(h1[real], h2[real], rtol=1e-6, atol=1e-6)
    assert kv1.length == kv2.length and kv1.keys.shape == kv2.keys.shape
    assert torch.allclose(kv1.keys, kv2.keys, rtol=1e-6, atol=1e-6)
    assert torch.allclose(kv1.values, kv2.values, rtol=1e-6, atol=1e-6)
    assert torch.allclose(once.parts[0][real], every.parts[0][real], rtol=1e-6, atol=1e-6)
    # the copies are of the right rows: rows 1 and 3 share tokens, not states
    assert not torch.allclose(h1[1, -1], h1[3, -1], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sampled_tokens_and_logprobs_equal_the_models_own_cache(family):
    policy = HFPolicy(tiny(family))
    ids, mask = repeated_prompts()

    def run(trunk):
        return generate(policy, ids, mask, 10, eos_token_id=[5, 6], pad_token_id=0,
                        generator=torch.Generator().manual_seed(2), record=True, trunk=trunk)

    theirs = run(None)
    ours = run(StaticDecoder(view_of(policy), prefill_once=True))
    assert not torch.equal(theirs.tokens[0], theirs.tokens[2])   # repeated prompts, own draws
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.mask, theirs.mask)
    assert torch.allclose(ours.logprobs, theirs.logprobs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.hidden, theirs.hidden, rtol=1e-5, atol=1e-6)


def test_a_training_run_with_repeated_prompts_with_and_without_it(tok):
    """prefill_once on (the default) and off, four samples of each prompt: the same run to
    float32 rounding."""
    histories = []
    for once in (True, False):
        trainer = short_run(tok, prefill_once=once, samples_per_prompt=4)
        trunk = trainer.engine.sampling_trunk(trainer.policy)
        assert isinstance(trunk, StaticDecoder) and trunk.prefill_once is once
        histories.append(trainer.train())
    for a, b in zip(*histories, strict=True):
        for key in ("loss", "kl", "reward_mean", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert FastCPUSettings().prefill_once

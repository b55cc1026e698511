"""The sampler's draw (inverse CDF) and fixed-length responses with ``ignore_eos``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from ppolm import CallableReward, HFPolicy, TextGenerationEnv, TransformerPolicy
from ppolm.policies.base import forward_response
from ppolm.sampling import (
    _PACKED_ROWS,
    PackedWeights,
    can_pack,
    draw,
    generate,
    packed_linears,
)


def test_draw_follows_the_probabilities_and_skips_zeros():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 1.0]])
    n = 20000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(n // 500):
        idx = draw(probs.repeat_interleave(500, 0), gen).view(2, 500)
        for row in range(2):
            counts[row] += torch.bincount(idx[row], minlength=5).float()
    freq = counts / n
    assert freq[0, 1] == 0 and freq[0, 4] == 0 and freq[1, 4] == 1
    sd = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 4 * sd + 1e-9).all(), freq


def test_draw_is_reproducible_with_a_generator():
    probs = torch.softmax(torch.randn(8, 100), -1)
    a = draw(probs, torch.Generator().manual_seed(3))
    b = draw(probs, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


class MostlyEOS(TransformerPolicy):
    """Puts almost all probability on EOS (id 1 in the character tokenizer)."""

    def head(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., 1] = 8.0
        return logits


def test_ignore_eos_gives_every_response_max_new_tokens(tok):
    policy = MostlyEOS(len(tok), hidden_size=32)
    reward = CallableReward(lambda ps, rs: [0.0] * len(rs))
    cpu = torch.device("cpu")
    stop = TextGenerationEnv(["ab", "cde"], tok, reward, max_new_tokens=6)
    short = stop.sample(policy, 8, 1.0, cpu, torch.Generator().manual_seed(0))
    assert short.response_mask.shape[1] < 6              # every row stopped at an EOS

    fixed = TextGenerationEnv(["ab", "cde"], tok, reward, max_new_tokens=6, ignore_eos=True)
    ep = fixed.sample(policy, 8, 1.0, cpu, torch.Generator().manual_seed(0))
    assert ep.response_mask.shape == (8, 6) and bool(ep.response_mask.bool().all())
    response = ep.input_ids[:, -6:]
    assert (response == tok.eos_token_id).sum(1).gt(1).all()   # EOS sampled, and sampled on


mkl = pytest.mark.skipif(not (torch.backends.mkl.is_available()
                              and hasattr(torch.ops.mkl, "_mkl_linear")), reason="needs MKL")


@mkl
def test_packed_weights_give_the_usual_products():
    """The packed product equals F.linear bitwise (bias or not, a strided input), is packed once
    per weight, and other row counts, gradients and float64 take the usual product."""
    torch.manual_seed(0)
    w, b = torch.randn(300, 64), torch.randn(300)
    packs = PackedWeights(5)
    x = torch.randn(5, 7, 64)[:, -1]                          # a strided (5, 64) view
    with torch.no_grad():
        assert torch.equal(packs.linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(packs.linear(x, w, None), F.linear(x, w))
        assert len(packs._packed) == 1
        pack = packs._packed[id(w)][1]
        x3 = torch.randn(5, 1, 64)
        assert torch.equal(packs.linear(x3, w, None), F.linear(x3, w))
        assert packs._packed[id(w)][1] is pack                # reused, not packed again
        x6 = torch.randn(6, 64)                               # another row count: usual path
        assert torch.equal(packs.linear(x6, w, b), F.linear(x6, w, b))
        many = torch.randn(_PACKED_ROWS + 1, 64)
        assert not can_pack(many, w) and can_pack(x, w)
        assert not can_pack(x.double(), w.double())
    assert not can_pack(x, w)                                 # gradients on
    xg = x.clone().requires_grad_()
    packs.linear(xg, w, b).sum().backward()                   # with gradient: usual path
    torch.testing.assert_close(xg.grad, w.sum(0).expand(5, 64))


@mkl
def test_packed_linears_give_the_usual_outputs_and_are_restored(tok):
    """On a real HF Llama: a decoding step through packed linears gives the usual hidden states,
    packs only the layers it calls (not the unused LM head module), leaves the prefill on the
    usual path, and restores the modules."""
    torch.manual_seed(0)
    policy = HFPolicy(tiny_llama(len(tok)))
    linears = [m for m in policy.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(4, len(tok), (3, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    packs = PackedWeights(3)
    with torch.no_grad():
        usual, cache = policy.trunk(ids[:, :4], mask[:, :4], use_cache=True)
        usual_step, _ = policy.trunk(ids[:, 4:], mask, cache=cache, use_cache=True)
        with packed_linears(policy, packs):
            assert all("forward" in m.__dict__ for m in linears)
            ours, cache = policy.trunk(ids[:, :4], mask[:, :4], use_cache=True)
            assert not packs._packed                          # 12 rows: the prefill
            ours_step, _ = policy.trunk(ids[:, 4:], mask, cache=cache, use_cache=True)
    assert torch.equal(ours, usual) and torch.equal(ours_step, usual_step)
    head = policy.head_params()[0]
    assert len(packs._packed) == len(linears) - 1 and id(head) not in packs._packed
    assert not any("forward" in m.__dict__ for m in linears)   # restored


def test_sampling_with_packed_weights_matches_a_forward_pass(tok):
    """The sampler's recorded logprobs and states (packed decoding steps and head on CPU) equal
    a forward pass over the finished sequences, to float rounding."""
    torch.manual_seed(0)
    policy = HFPolicy(tiny_llama(len(tok)))
    ids = torch.randint(4, len(tok), (4, 6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = generate(policy, ids, mask, 5, None, 0, temperature=0.7,
                   generator=torch.Generator().manual_seed(1), record=True)
    full = torch.cat([ids, out.tokens], 1)
    with torch.no_grad():
        fwd = forward_response(policy, full, torch.cat([mask, out.mask], 1), 5, 0.7)
    torch.testing.assert_close(out.logprobs, fwd.logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.hidden, fwd.hidden, atol=2e-5, rtol=0)

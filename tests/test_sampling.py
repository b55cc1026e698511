"""The sampler's draw (inverse CDF) and fixed-length responses with ``ignore_eos``."""

from __future__ import annotations

import torch

from conftest import tiny_llama
from ppolm import CallableReward, HFPolicy, TextGenerationEnv, TransformerPolicy
from ppolm.rollout.sampling import draw, generate


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


def flat_draw(probs, generator):
    """The one-level inverse CDF: one float64 cumulative sum over the whole row."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def test_draw_equals_one_cumulative_sum_over_the_row():
    """The two-level draw (blocks, then a token inside the block) gives the token that one
    cumulative sum over the whole row gives for the same uniform draw, for a vocabulary of
    whole blocks and one with a partial last block."""
    torch.manual_seed(0)
    for V in (49152, 3000):
        probs = torch.softmax(torch.randn(256, V) * 4, -1)
        probs[:, 1000:2100] = 0                       # a whole zero block and zero edges
        probs = probs / probs.sum(-1, keepdim=True)
        got = draw(probs, torch.Generator().manual_seed(5))
        want = flat_draw(probs, torch.Generator().manual_seed(5))
        assert torch.equal(got, want)
        assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_draw_across_blocks_follows_the_probabilities():
    """Mass spread over several blocks, zeros at their edges: frequencies within 4 standard
    deviations, zero-probability tokens never drawn."""
    V = 5000
    probs = torch.zeros(1, V)
    probs[0, [0, 1023, 1024, 2047, 4999]] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    n = 40000
    idx = draw(probs.expand(n, V).contiguous(), torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=V).float() / n
    assert freq.sum() == 1 and bool((freq[probs[0] == 0] == 0).all())
    sd = (probs[0] * (1 - probs[0]) / n).sqrt()
    assert bool(((freq - probs[0]).abs() <= 4 * sd + 1e-9).all()), freq[probs[0] > 0]


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


def test_sampling_matches_a_forward_pass(tok):
    """The sampler's recorded logprobs and states (decoding steps over the cache, the head on
    the last position) equal a forward pass over the finished sequences, to float rounding."""
    # Imported here: the engines refactor moves it (from ppolm.policies.base).
    from ppolm.engines.fast_cpu.forward import forward_response
    from ppolm.engines.fast_cpu.views import view_of

    torch.manual_seed(0)
    policy = HFPolicy(tiny_llama(len(tok)))
    ids = torch.randint(4, len(tok), (4, 6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = generate(policy, ids, mask, 5, None, 0, temperature=0.7,
                   generator=torch.Generator().manual_seed(1), record=True)
    full = torch.cat([ids, out.tokens], 1)
    with torch.no_grad():
        fwd = forward_response(view_of(policy), full, torch.cat([mask, out.mask], 1), 5, 0.7)
    torch.testing.assert_close(out.logprobs, fwd.logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.hidden, fwd.hidden, atol=2e-5, rtol=0)


class AOrCHF(HFPolicy):
    """A tiny Llama whose logits put probability 1/2 on 'a' and on 'c' (never on EOS)."""

    def head(self, hidden):
        logits = torch.full((*hidden.shape[:-1], self.vocab_size), -1e9)
        logits[..., [4, 6]] = 0.0                             # 'a', 'c' in the char tokenizer
        return logits


def test_a_generation_config_with_several_eos_ids_stops_on_each(tok):
    """A policy whose generation config lists two end-of-sequence ids ([EOS, 'c']) stops at 'c'
    too: 'c' is a response token, the mask is 0 after it, the row has ended, the text has no
    'c'. With the config's EOS alone, or with ignore_eos, 'c' is an ordinary token."""
    from transformers import GenerationConfig

    c = tok.convert_tokens_to_ids("c")
    model = tiny_llama(len(tok))
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, c])
    policy = AOrCHF(model)
    reward = CallableReward(lambda ps, rs: [0.0] * len(rs))
    cpu = torch.device("cpu")
    env = TextGenerationEnv(["ab", "cde"], tok, reward, max_new_tokens=6)
    assert env.stop_ids(policy) == [tok.eos_token_id, c]
    ep = env.sample(policy, 16, 1.0, cpu, torch.Generator().manual_seed(0))
    resp = ep.input_ids[:, -ep.response_mask.shape[1]:]
    lengths = ep.response_mask.sum(1).tolist()
    assert max(lengths) > 1 and min(lengths) < resp.shape[1] and ep.ended.any()
    for ids, m, ended, text in zip(resp.tolist(), ep.response_mask.tolist(),
                                   ep.ended.tolist(), ep.responses, strict=True):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        assert ids[n:] == [tok.pad_token_id] * (len(m) - n)
        assert ids[: n - 1] == [4] * (n - 1)                  # 'a's up to the end
        assert ended == (ids[n - 1] == c)
        assert text == "a" * (n - 1 if ended else n)

    # The sampler itself, given both ids: a row stops at the first of either.
    ids = torch.tensor([[4, 5, 6], [7, 8, 9]])
    out = generate(policy, ids, torch.ones_like(ids), 6, [tok.eos_token_id, c], 0,
                   generator=torch.Generator().manual_seed(0))
    stopped = 0
    for row, m in zip(out.tokens.tolist(), out.mask.tolist(), strict=True):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n) and row[n:] == [0] * (len(m) - n)
        assert c not in row[: n - 1] and (row[n - 1] == c or n == 6)
        stopped += row[n - 1] == c
    assert stopped > 0

    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    assert env.stop_ids(policy) == [tok.eos_token_id]
    one = env.sample(policy, 16, 1.0, cpu, torch.Generator().manual_seed(0))
    assert one.response_mask.shape == (16, 6) and not one.ended.any()

    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, c])
    fixed = TextGenerationEnv(["ab", "cde"], tok, reward, max_new_tokens=6, ignore_eos=True)
    ep = fixed.sample(policy, 16, 1.0, cpu, torch.Generator().manual_seed(0))
    assert ep.response_mask.shape == (16, 6) and bool(ep.response_mask.bool().all())
    assert (ep.input_ids[:, -6:] == c).sum(1).gt(1).any()      # 'c' sampled, and sampled on

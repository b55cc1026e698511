"""Every policy: logits independent of padding and batch-mates (through both engines' response
forwards), the response-only forward equal to slices of the full one, cached sampling equal to a
full forward, HF parity with the wrapped model, save and load."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from ppolm import HFPolicy, LSTMPolicy, PlainEngine, TransformerPolicy, ValueHead
from ppolm.engines import Sequences
from ppolm.engines.fast_cpu import forward as fast_forward
from ppolm.engines.fast_cpu.views import view_of
from ppolm.errors import CheckpointError, ConfigError

VOCAB = 14


def make(kind: str):
    torch.manual_seed(0)
    if kind == "lstm":
        return LSTMPolicy(VOCAB, hidden_size=32, n_layers=2)
    if kind == "transformer":
        return TransformerPolicy(VOCAB, hidden_size=32, n_layers=2, n_heads=4)
    if kind == "llama":
        return HFPolicy(tiny_llama(VOCAB))
    return HFPolicy(tiny_gpt2(VOCAB))


KINDS = ["lstm", "transformer", "llama", "gpt2"]


def plain_response(policy, ids, mask, T, temperature):
    """The plain engine's response forward (the policy's own ``forward``, then log-softmax)."""
    return PlainEngine().forward_response(policy, Sequences(ids, mask, T), temperature)


def fast_response(policy, ids, mask, T, temperature):
    """The fast CPU engine's response forward (trunk, then the fused head)."""
    return fast_forward.forward_response(view_of(policy), ids, mask, T, temperature)


PATHS = {"plain": plain_response, "fast_cpu": fast_response}


def pad_left(seqs: list[list[int]], length: int, pad: int = 0):
    ids = torch.full((len(seqs), length), pad)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):] = torch.tensor(s)
        mask[b, length - len(s):] = 1
    return ids, mask


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_do_not_depend_on_padding_or_batch_mates(kind, path):
    policy = make(kind)
    forward_response = PATHS[path]
    target = [4, 5, 6, 7, 8, 9, 10]
    others = [[5, 6], [11, 12, 13, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7, 7, 7]]
    T = 3
    with torch.no_grad():
        alone_ids, alone_mask = pad_left([target], len(target))
        alone = forward_response(policy, alone_ids, alone_mask, T, 0.7).logprobs[0]
        for extra_pad in (0, 5):
            batch = [target] + others
            ids, mask = pad_left(batch, max(map(len, batch)) + extra_pad)
            got = forward_response(policy, ids, mask, T, 0.7).logprobs[0]
            assert torch.allclose(got, alone, atol=1e-5), (kind, extra_pad, got - alone)
        # right padding after the sequence (as after an EOS) leaves earlier positions unchanged
        ids = torch.tensor([target + [0, 0]])
        mask = torch.tensor([[1] * len(target) + [0, 0]])
        full = policy(ids, mask).logits[0, : len(target)]
        ref = policy(alone_ids, alone_mask).logits[0]
        assert torch.allclose(full, ref, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_response_len_forward_is_the_slice_of_the_full_forward(kind):
    policy = make(kind)
    ids, mask = pad_left([[4, 5, 6, 7, 8, 9], [11, 12, 13], [7, 8, 9, 10]], 8)
    B, L, T = 3, 8, 3
    with torch.no_grad():
        full = policy(ids, mask)
        part = policy(ids, mask, response_len=T)
        no_head = policy(ids, mask, response_len=T, logits=False)
    assert full.hidden.shape == (B, L, policy.hidden_size)
    assert full.logits.shape == (B, L, policy.vocab_size)
    assert part.hidden.shape == (B, T, policy.hidden_size)
    assert part.logits.shape == (B, T, policy.vocab_size)
    # position i predicts token i + 1: the last T tokens are predicted by positions L-T-1..L-2
    assert torch.allclose(part.hidden, full.hidden[:, L - T - 1: L - 1], atol=1e-6)
    assert torch.allclose(part.logits, full.logits[:, L - T - 1: L - 1], atol=1e-5)
    assert no_head.logits is None and torch.allclose(no_head.hidden, part.hidden, atol=1e-6)
    # and the engines' response forwards score exactly those positions' predictions
    expect = torch.log_softmax(full.logits[:, L - T - 1: L - 1], -1).gather(
        -1, ids[:, L - T:, None]).squeeze(-1)
    for run in PATHS.values():
        with torch.no_grad():
            assert torch.allclose(run(policy, ids, mask, T, 1.0).logprobs, expect, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_steps_match_a_full_forward(kind):
    policy = make(kind)
    ids, mask = pad_left([[4, 5, 6], [7, 8, 9, 10, 11]], 5)
    new = torch.tensor([[12, 1], [13, 4]])
    with torch.no_grad():
        hidden, cache = policy.trunk(ids, mask, use_cache=True)
        steps = [policy.head(hidden[:, -1])]
        m = mask
        for t in range(new.shape[1]):
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            hidden, cache = policy.trunk(new[:, t: t + 1], m, cache=cache, use_cache=True)
            steps.append(policy.head(hidden[:, -1]))
        full = policy(torch.cat([ids, new], 1), m).logits[:, -3:]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_hf_policy_logits_equal_the_wrapped_model(make_model):
    model = make_model(VOCAB)
    policy = HFPolicy(model)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(policy(ids, mask).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("path", list(PATHS))
def test_temperature_scales_logits_before_logprobs(path):
    policy = make("transformer")
    ids, mask = pad_left([[4, 5, 6, 7]], 4)
    with torch.no_grad():
        out = PATHS[path](policy, ids, mask, 2, temperature=0.5)
        logits = policy(ids, mask).logits[0, 1:3] / 0.5
    expect = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs[0], expect.gather(-1, ids[0, 2:, None]).squeeze(-1),
                          atol=1e-6)
    entropy = -(expect.exp() * expect).sum(-1)
    assert torch.allclose(out.entropy[0], entropy, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "transformer", "llama"])
def test_save_and_load_round_trip(kind, tmp_path):
    policy = make(kind)
    policy.save(tmp_path / "p")
    other = make(kind)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load(tmp_path / "p")
    for a, b in zip(policy.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_rebuild_from_saved_and_corrupt_file(tmp_path):
    policy = make("transformer")
    policy.save(tmp_path)
    again = TransformerPolicy.from_saved(tmp_path)
    assert again.arch == policy.arch
    (tmp_path / "policy.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        TransformerPolicy.from_saved(tmp_path)
    with pytest.raises(CheckpointError, match="No saved policy"):
        LSTMPolicy.from_saved(tmp_path / "missing")


def test_hf_policy_from_a_local_folder(tmp_path):
    tiny_llama(VOCAB).save_pretrained(tmp_path / "m")
    policy = HFPolicy(tmp_path / "m")
    assert policy.vocab_size == VOCAB and policy.hidden_size == 32
    with pytest.raises(CheckpointError, match="does not exist"):
        HFPolicy(tmp_path / "nope")


def test_value_head_setups():
    policy = make("transformer")
    ids, mask = pad_left([[4, 5, 6, 7, 8]], 5)
    seqs = Sequences(ids, mask, 2)
    engine = PlainEngine()
    fwd = engine.forward_response(policy, seqs, 1.0)
    shared = ValueHead(policy.hidden_size)
    assert shared.shared and shared.critic is None
    values = shared(fwd.hidden)
    assert values.shape == (1, 2) and values.dtype == torch.float32
    expect = (fwd.hidden.float() @ shared.linear.weight.T + shared.linear.bias).squeeze(-1)
    assert torch.allclose(values, expect, atol=1e-6)
    # shared: the value loss reaches the trunk
    shared(fwd.hidden).sum().backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    policy.zero_grad(set_to_none=True)
    # detached: the value loss does not reach the trunk
    detached = ValueHead(policy.hidden_size, detach=True)
    detached(fwd.hidden).sum().backward()
    assert all(p.grad is None for p in policy.parameters())
    assert detached.linear.weight.grad is not None
    # separate: a copy of the policy as critic trunk, whose states the engine computes
    separate = ValueHead.separate(policy)
    assert separate.critic is not policy and not separate.shared
    assert all(torch.equal(a, b) for a, b in zip(separate.critic.state_dict().values(),
                                                 policy.state_dict().values(), strict=True))
    v = separate(engine.forward_hidden(separate.critic, seqs))
    assert v.shape == (1, 2)


def test_bad_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        TransformerPolicy(VOCAB, hidden_size=30, n_heads=4)

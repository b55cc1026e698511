"""Every policy: logits independent of padding and batch-mates, cached sampling equal to a full
forward, HF parity with the wrapped model, save and load."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from ppolm import HFPolicy, LSTMPolicy, TransformerPolicy, ValueHead
from ppolm.errors import CheckpointError, ConfigError
from ppolm.policies.base import forward_response

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


def pad_left(seqs: list[list[int]], length: int, pad: int = 0):
    ids = torch.full((len(seqs), length), pad)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):] = torch.tensor(s)
        mask[b, length - len(s):] = 1
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_do_not_depend_on_padding_or_batch_mates(kind):
    policy = make(kind)
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
        full = policy(ids, mask)[0, : len(target)]
        ref = policy(alone_ids, alone_mask)[0]
        assert torch.allclose(full, ref, atol=1e-5)


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
        full = policy(torch.cat([ids, new], 1), m)[:, -3:]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_hf_policy_logits_equal_the_wrapped_model(make_model):
    model = make_model(VOCAB)
    policy = HFPolicy(model)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(policy(ids, mask), model(input_ids=ids).logits, atol=1e-5)


def test_temperature_scales_logits_before_logprobs():
    policy = make("transformer")
    ids, mask = pad_left([[4, 5, 6, 7]], 4)
    with torch.no_grad():
        out = forward_response(policy, ids, mask, 2, temperature=0.5)
        logits = policy(ids, mask)[0, 1:3] / 0.5
    expect = torch.log_softmax(logits, -1).gather(-1, ids[0, 2:, None]).squeeze(-1)
    assert torch.allclose(out.logprobs[0], expect, atol=1e-6)


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
    fwd = forward_response(policy, ids, mask, 2, 1.0)
    shared = ValueHead(policy.hidden_size)
    assert shared(fwd.hidden, ids, mask, 2).shape == (1, 2)
    # detached: the value loss does not reach the trunk
    detached = ValueHead(policy.hidden_size, detach=True)
    detached(fwd.hidden, ids, mask, 2).sum().backward()
    assert all(p.grad is None for p in policy.parameters())
    separate = ValueHead.separate(policy)
    assert separate.critic is not policy and not separate.shared
    v = separate(None, ids, mask, 2)
    assert v.shape == (1, 2)


def test_bad_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        TransformerPolicy(VOCAB, hidden_size=30, n_heads=4)

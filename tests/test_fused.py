"""The fused head + logprobs function against plain autograd, and the fast engine's
forward_response: its two paths against each other and against the plain engine's."""

from __future__ import annotations

import pytest
import torch

from ppolm.engines import PlainEngine, Sequences
from ppolm.engines.fast_cpu import fused, grad_buffers
from ppolm.engines.fast_cpu.forward import forward_response
from ppolm.engines.fast_cpu.fused import head_logprobs
from ppolm.engines.fast_cpu.grad_buffers import accumulate_into_grad
from ppolm.engines.fast_cpu.views import view_of


def reference(hidden, weight, bias, tokens, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    """Small blocks and chunks, so the block-by-block and row-chunk loops run many times."""
    if request.param == "many chunks":
        monkeypatch.setattr(fused, "_BLOCK", 120)
        monkeypatch.setattr(fused, "_CHUNK", 100)
        monkeypatch.setattr(fused, "_COLUMN_BLOCK", 120)


@pytest.fixture(params=["columns", "rows"])
def layout(request, monkeypatch):
    """Both layouts of the logits on CPU: transposed (V, R), the CPU default, and row-major
    (R, V), the CUDA one."""
    if request.param == "rows":
        monkeypatch.setattr(fused, "_COLUMN_DEVICES", set())


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_matches_autograd(with_bias, temperature, chunking, layout):
    torch.manual_seed(0)
    R, H, V = 12, 8, 50
    base = [torch.randn(R, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64),
            torch.randn(V, dtype=torch.float64)]
    tokens = torch.randint(0, V, (R,))
    upstream = torch.randn(R, dtype=torch.float64)
    grads = []
    for use_fused in (True, False):
        h, w, b = (t.clone().requires_grad_(True) for t in base)
        bias = b if with_bias else None
        f = head_logprobs if use_fused else reference
        logprobs, ent = f(h, w, bias, tokens, temperature)
        (logprobs * upstream).sum().backward()
        grads.append((logprobs.detach(), ent.detach(), h.grad, w.grad, b.grad))
    for a, b in zip(*grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_without_grad_and_entropy_has_no_grad(with_bias, chunking, layout):
    torch.manual_seed(0)
    h, w = torch.randn(13, 4), torch.randn(9, 4, requires_grad=True)
    b = torch.randn(9) if with_bias else None
    tokens = torch.randint(0, 9, (13,))
    with torch.no_grad():
        lp, ent = head_logprobs(h, w, b, tokens, 0.5)
    exp_lp, exp_ent = reference(h, w.detach(), b, tokens, 0.5)
    assert torch.allclose(lp, exp_lp, atol=1e-6) and torch.allclose(ent, exp_ent, atol=1e-5)
    lp, ent = head_logprobs(h, w, None, tokens, 0.5)
    assert lp.requires_grad and not ent.requires_grad


def test_forward_response_fused_and_plain_paths_agree(layout):
    from ppolm import TransformerPolicy

    torch.manual_seed(0)
    policy = TransformerPolicy(20, hidden_size=16, n_layers=1, n_heads=2, max_length=16)
    ids = torch.randint(1, 20, (3, 7))
    mask = torch.ones_like(ids)
    view = view_of(policy)
    assert view.head_params() is not None                     # the fused path is taken
    fast = forward_response(view, ids, mask, 4, 0.8)
    plain = forward_response(view, ids, mask, 4, 0.8, entropy_grad=True)
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-6)
    assert torch.allclose(fast.entropy, plain.entropy, atol=1e-5)
    assert plain.entropy.requires_grad and not fast.entropy.requires_grad
    g_fast = torch.autograd.grad(fast.logprobs.sum(), policy.lm_head.weight)[0]
    g_plain = torch.autograd.grad(plain.logprobs.sum(), policy.lm_head.weight)[0]
    assert torch.allclose(g_fast, g_plain, atol=1e-6)
    # ... and both give the reference implementation's numbers (PlainEngine: the policy's
    # forward, logits then log-softmax)
    ref = PlainEngine().forward_response(policy, Sequences(ids, mask, 4), 0.8)
    assert ref.logprobs.shape == fast.logprobs.shape == (3, 4)
    for fwd in (fast, plain):
        torch.testing.assert_close(fwd.logprobs, ref.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(fwd.entropy, ref.entropy, rtol=0, atol=1e-5)
        torch.testing.assert_close(fwd.hidden, ref.hidden, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_gradient_added_into_the_weights_grad(temperature, layout):
    """Inside accumulate_into_grad the weight's existing .grad receives the head's gradient in
    place (same storage, old contents kept) and autograd gets none (a hook on the weight sees
    no gradient); a weight without a .grad, or outside the block, gets its gradient the usual
    way."""
    torch.manual_seed(0)
    R, H, V = 12, 8, 50
    hidden = torch.randn(R, H)
    weight = torch.randn(V, H, requires_grad=True)
    tokens = torch.randint(0, V, (R,))
    g_up = torch.randn(R)
    ref_lp, _ = reference(hidden, weight, None, tokens, temperature)
    (want,) = torch.autograd.grad((ref_lp * g_up).sum(), [weight])

    def backward() -> bool:
        """Whether autograd handed the weight a gradient."""
        hooked: list[bool] = []
        handle = weight.register_hook(lambda g: hooked.append(g is not None))
        lp, _ = head_logprobs(hidden, weight, None, tokens, temperature)
        (lp * g_up).sum().backward()
        handle.remove()
        return any(hooked)

    before = torch.randn(V, H)
    weight.grad = before.clone()
    ptr = weight.grad.data_ptr()
    with accumulate_into_grad([weight]):
        hooked = backward()
    assert not hooked and weight.grad.data_ptr() == ptr
    torch.testing.assert_close(weight.grad, before + want, rtol=1e-5, atol=1e-6)
    assert not grad_buffers._INTO_GRAD                # the registration ends with the block

    weight.grad = None                                # no buffer yet: the usual return
    with accumulate_into_grad([weight]):
        hooked = backward()
    assert hooked
    torch.testing.assert_close(weight.grad, want, rtol=1e-5, atol=1e-6)

    weight.grad = before.clone()                      # outside the block: autograd adds it
    assert backward()
    torch.testing.assert_close(weight.grad, before + want, rtol=1e-5, atol=1e-6)

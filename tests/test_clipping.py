"""Global-norm clipping inside the optimizer step: the norm against float64, and a step with a
factor against torch's clip-then-step, for the fused AdamW (the factor as its grad_scale) and
for optimizers that get the plain multiplication; the fast engine's step against the plain
engine's."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ppolm.engines.fast_cpu import clipping


def make_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    shapes = [(300, 40), (40,), (7, 5, 3), (1000,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(3)))          # gets no gradient
    for i, p in enumerate(params[:-1]):
        p.grad = torch.randn_like(p) * (i + 1) + 0.5           # offsets: a hard sum for float32
    params[2].grad = torch.randn(3, 5, 7).permute(2, 1, 0)     # non-contiguous: vector_norm path
    return params


def test_grad_norm_is_the_float64_norm():
    params = make_params()
    want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    got = clipping.grad_norm(params)
    assert got.dtype == torch.float64
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)
    assert float(clipping.grad_norm([torch.nn.Parameter(torch.ones(2))])) == 0.0   # no grads


def test_grad_norm_is_no_less_accurate_than_torch():
    g = torch.randn(2_000_000) * 1e-3 + 1e-3
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g
    exact = float((g.double() ** 2).sum().sqrt())
    ours = abs(float(clipping.grad_norm([p])) - exact)
    theirs = abs(float(torch.nn.utils.get_total_norm([g])) - exact)
    assert ours <= max(theirs, 1e-6 * exact)


def test_clip_factor():
    assert clipping.clip_factor(3.0, None) == 1.0
    assert clipping.clip_factor(0.5, 1.0) == 1.0
    assert clipping.clip_factor(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6), rel=1e-12)
    # as torch's clip_grad_norm_: the same factor multiplies the gradients
    params = make_params()
    grads = [p.grad.clone() for p in params if p.grad is not None]
    norm = float(clipping.grad_norm(params))
    torch.nn.utils.clip_grad_norm_(params, 2.0)
    for g, p in zip(grads, [p for p in params if p.grad is not None], strict=True):
        torch.testing.assert_close(p.grad, g * clipping.clip_factor(norm, 2.0))


@pytest.mark.parametrize("kind", ["adamw fused", "adamw foreach", "sgd"])
@pytest.mark.parametrize("factor", [1.0, 0.3])
def test_step_with_factor_equals_clip_then_step(kind, factor):
    def optimizer(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1,
                                 fused=kind == "adamw fused", foreach=kind != "adamw fused")

    base = make_params()
    runs = []
    for ours in (True, False):
        params = copy.deepcopy(base)
        for p, b in zip(params, base, strict=True):
            p.grad = None if b.grad is None else b.grad.clone()
        opt = optimizer(params)
        for step in range(3):
            if step:
                for p, b in zip(params, base, strict=True):
                    p.grad = None if b.grad is None else b.grad * (step + 1)
            if ours:
                clipping.step_with_factor(opt, params, factor)
            else:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)
                opt.step()
        assert not hasattr(opt, "grad_scale")            # the fused path cleans up after itself
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    moved = [float((a - b).detach().abs().max()) for a, b in zip(runs[0], base, strict=True)]
    assert max(moved) > 1e-3                             # the steps did move the weights


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_fast_engine_step_equals_the_plain_engines(max_grad_norm):
    """FastCPUEngine.step (the norm by dot products, the factor inside the fused AdamW) against
    PlainEngine.step (clip_grad_norm_, then torch's AdamW): the same norm and, over three
    steps, the same weights; a non-finite loss or norm drops the gradients and skips the step
    on both."""
    from ppolm import TransformerPolicy, ValueHead
    from ppolm.engines import FastCPUEngine, OptimizerSettings, PlainEngine

    torch.manual_seed(0)
    base = TransformerPolicy(20, hidden_size=16, n_layers=1, n_heads=2, max_length=16)
    base_head = ValueHead(16)
    settings = OptimizerSettings(learning_rate=1e-2, max_grad_norm=max_grad_norm)
    runs = []
    for engine in (FastCPUEngine(), PlainEngine()):
        policy, head = copy.deepcopy(base), copy.deepcopy(base_head)
        engine.setup(policy, head, copy.deepcopy(base).requires_grad_(False), settings)
        gen = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(3):
            engine.zero_grad()
            for p in engine.params:
                p.grad = torch.randn(p.shape, generator=gen)
            result = engine.step()
            assert result.applied
            norms.append(result.grad_norm)
        before = [p.detach().clone() for p in engine.params]
        for finite, bad in ((False, 0.0), (True, math.nan)):
            engine.zero_grad()
            for p in engine.params:
                p.grad = torch.full_like(p, bad)
            skipped = engine.step(loss_finite=finite)
            assert not skipped.applied
            assert all(p.grad is None for p in engine.params)
            assert all(torch.equal(p, b) for p, b in zip(engine.params, before, strict=True))
        assert math.isnan(skipped.grad_norm)
        runs.append((norms, before))
    (n0, w0), (n1, w1) = runs
    assert n0 == pytest.approx(n1, rel=1e-6)
    if max_grad_norm is not None:
        assert min(n0) > max_grad_norm                   # every step clipped
    for a, b in zip(w0, w1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

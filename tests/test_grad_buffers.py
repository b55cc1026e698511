"""Persistent gradient buffers (the fast CPU engine's ``engine.buffers``): the optimizer gets
exactly the dense gradients of the default backward, for tied tables (the head's gradient and
the rows added into one buffer), untied ones (zeroed only in the rows written), linear layers and
a separate critic, and the clipping norm is the same; the buffers are reused, the modules
restored after the update, and a whole update equals the plain engine's."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from ppolm import (
    HFPolicy,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    ValueHead,
    char_tokenizer,
)
from ppolm.engines import FastCPUEngine, PlainEngine
from ppolm.engines.fast_cpu import clipping
from ppolm.engines.fast_cpu.grad_buffers import GradBuffers
from ppolm.rollout.tasks import make_task


def build(kind: str, keep_freed_memory: bool = False, ent_coef: float = 0.0,
          engine: str = "fast_cpu") -> Trainer:
    task = make_task("continue")
    tok = char_tokenizer(task.alphabet)
    if kind == "transformer":        # tied token table, untied position table, shared value head
        policy, value = TransformerPolicy(len(tok), hidden_size=32), None
    else:                            # HF Llama, untied tables, and a separate critic
        policy = HFPolicy(tiny_llama(len(tok)))
        value = ValueHead.separate(policy)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=4, seed=0)
    cfg = PPOConfig(iterations=2, batch_size=8, minibatch_size=4, micro_batch_size=2,
                    ppo_epochs=1, progress=False, engine=engine,
                    keep_freed_memory=keep_freed_memory,   # False: the linears' buffers too
                    ent_coef=ent_coef)
    return Trainer(policy, env, cfg, value_head=value)


def grads(trainer: Trainer) -> list[torch.Tensor | None]:
    """Copies of the gradients (None for a parameter the loss does not reach, such as the
    separate critic's unused LM head); every gradient must be dense."""
    params = trainer.engine.params
    assert all(p.grad is None or p.grad.layout == torch.strided for p in params)
    return [None if p.grad is None else p.grad.clone() for p in params]


def backward(trainer: Trainer, minibatch) -> None:
    """A minibatch's backward passes, then what the engine's step does first: a gradient that
    came out sparse made dense, and each kept as its buffer for the next minibatch."""
    rollout, advantages = minibatch
    trainer.accumulate_gradients(rollout, advantages)
    trainer.engine.buffers.densify()


@pytest.mark.parametrize("kind", ["transformer", "hf"])
@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
@pytest.mark.parametrize("linears", [True, False])
def test_buffers_give_the_dense_gradient(kind, ent_coef, linears):
    """Three minibatches in a row (different tokens, so different table rows): with the
    buffers, each minibatch's gradients and their global norm equal those of the default
    backward, though a row table's buffer is zeroed only in the rows written and the head's
    buffer not at all (its backward writes over it; with the entropy in the loss the head's
    gradient comes through autograd, which must find the buffer zeroed). With ``linears``
    the head's linear layer adds its own gradient in place too."""
    trainer = build(kind, ent_coef=ent_coef, keep_freed_memory=not linears)
    engine = trainer.engine
    assert isinstance(engine, FastCPUEngine)
    buffers = engine.buffers
    assert bool(buffers.linears) == linears
    assert buffers.embeddings                     # there are trained tables to make sparse
    if kind == "hf":
        assert buffers.row_tables                 # untied tables: rows recorded
    torch.manual_seed(0)
    _, rollout = trainer.collect()
    _, more = trainer.collect()
    adv, more_adv = trainer.compute_advantages(rollout), trainer.compute_advantages(more)
    parts = [(r.select(i), a.select(i)) for r, a, i in (
        (rollout, adv, torch.arange(0, 4)), (more, more_adv, torch.arange(4, 8)),
        (rollout, adv, torch.arange(4, 8)))]
    dense, norms = [], []
    for mb in parts:
        trainer.accumulate_gradients(*mb)    # outside active(): the default dense backward
        dense.append(grads(trainer))
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in dense[-1]
                                          if g is not None))))
    assert not buffers.held              # no buffer yet: the block starts from none
    kept, rows_seen = [], 0
    with buffers.active():
        # The first minibatch finds which tables need a buffer; the later ones use them.
        for mb, want, norm in zip(parts, dense, norms, strict=True):
            backward(trainer, mb)
            for got, w in zip(grads(trainer), want, strict=True):
                assert (got is None) == (w is None)
                if got is not None:
                    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
            for t in buffers.row_tables:
                rows = buffers.rows(t)
                assert rows is not None and t.grad is not None
                # every row that holds some gradient is named (a looked-up row may get none)
                assert set(t.grad.abs().sum(1).nonzero()[:, 0].tolist()) <= set(rows.tolist())
                assert len(set(rows.tolist())) == len(rows) > 0
                rows_seen += 1
            got_norm = float(clipping.grad_norm(engine.params, buffers.rows))
            assert got_norm == pytest.approx(norm, rel=1e-6)
            kept.append({m: b.data_ptr() for m, b in buffers.held.items()})
    assert rows_seen == (3 * len(buffers.row_tables))
    # Every table, linear and head that the loss reaches got a buffer, reused (not
    # reallocated) by the later minibatches.
    assert kept[0] == kept[1] == kept[2]
    assert set(kept[0]) == {w for w in buffers.weights if w.grad is not None}
    head = trainer.engine.view(trainer.policy).head_params()
    assert head is not None and head[0] in kept[0]
    if kind == "transformer":                # tied token table (the head's weight) and positions
        assert trainer.policy.tok_emb.weight is head[0]
        assert trainer.policy.pos_emb.weight in kept[0]
    # Outside the block no rows are known (the hooks are gone) and no buffer is stale.
    assert all(buffers.rows(t) is None for t in buffers.row_tables)


def test_modules_restored_after_update():
    trainer = build("hf")
    buffers = trainer.engine.buffers
    assert buffers.linears and buffers.embeddings      # there is something to patch
    trainer.train()
    assert all(not m.sparse for m in buffers.embeddings)
    assert all("forward" not in m.__dict__ for m in buffers.linears)
    # no gradient is held between updates
    assert not buffers.held and all(p.grad is None for p in trainer.engine.params)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_input", [False, True])
def test_linear_adds_its_weight_gradient_into_the_buffer(bias, frozen_input):
    """A patched nn.Linear gives the same output and gradients as nn.Linear; with a buffer its
    weight gradient lands in place in the buffer (old contents kept), without one it is returned
    as usual."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=bias)
    x = torch.randn(2, 3, 6, requires_grad=not frozen_input)
    g = torch.randn(2, 3, 5)
    out = lin(x)
    want = torch.autograd.grad(out, [lin.weight] + ([x] if not frozen_input else []), g)
    want_b = g.sum((0, 1)) if bias else None
    buffers = GradBuffers(lin)
    assert buffers.linears == [lin]
    for with_buffer in (False, True):
        before = torch.randn(5, 6)
        lin.weight.grad = before.clone() if with_buffer else None
        if bias:
            lin.bias.grad = None
        ptr = lin.weight.grad.data_ptr() if with_buffer else None
        if not frozen_input:
            x.grad = None
        with buffers.active():
            got = lin(x)
            got.backward(g)
        torch.testing.assert_close(got, out)
        base = before if with_buffer else 0
        torch.testing.assert_close(lin.weight.grad, base + want[0], rtol=1e-6, atol=1e-6)
        if with_buffer:
            assert lin.weight.grad.data_ptr() == ptr
        if not frozen_input:
            torch.testing.assert_close(x.grad, want[1])
        if bias:
            torch.testing.assert_close(lin.bias.grad, want_b)
    assert "forward" not in lin.__dict__


@pytest.mark.parametrize("reference", ["no buffers", "plain engine"])
@pytest.mark.parametrize("kind", ["transformer", "hf"])
def test_update_with_buffers_equals_the_default_update(kind, reference):
    """A whole update (2 minibatches, clipped: the norm over recorded rows decides the step)
    leaves the same weights with the buffers as with PyTorch's default backward: the fast
    engine without buffers, and the plain engine (torch's AdamW and clip_grad_norm_, the
    policy's own forward)."""
    torch.manual_seed(0)
    a = build(kind)
    torch.manual_seed(0)
    b = build(kind, engine="fast_cpu" if reference == "no buffers" else "plain")
    if reference == "no buffers":
        b.engine.buffers = GradBuffers()              # none: the default backward
    else:
        assert isinstance(b.engine, PlainEngine)
    b.policy.load_state_dict(a.policy.state_dict())
    b.value_head.load_state_dict(a.value_head.state_dict())
    for t in (a, b):
        t.engine.max_grad_norm = 0.05                  # every step clipped
    _, rollout = a.collect()
    advantages = a.compute_advantages(rollout)
    stats = [t.update(rollout, advantages) for t in (a, b)]
    assert stats[0]["grad_norm"] > 0.05
    assert stats[0]["grad_norm"] == pytest.approx(stats[1]["grad_norm"], rel=1e-5)
    for (name, p), q in zip(a.policy.named_parameters(), b.policy.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for p, q in zip(a.value_head.parameters(), b.value_head.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

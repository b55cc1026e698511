"""An engine's ``state_dict`` is what the next update needs of it: loaded into a fresh engine
(over other models, with a fresh optimizer) it gives bitwise the next update of the engine that
gave it; the trained weights alone do not (the optimizer's moments are part of it). Through a
file too: the state loads with ``torch.load(weights_only=True)``. The distributed engine under 2
gloo ranks: tests/test_distributed.py."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import tiny_llama
from ppolm import FastCPUEngine, HFPolicy, PlainEngine, TransformerPolicy, ValueHead
from ppolm.engines import OptimizerSettings, Sequences
from ppolm.engines.base import Engine

VOCAB, T = 40, 4


def build(engine_name: str, kind: str, seed: int) -> Engine:
    torch.manual_seed(seed)
    policy = (TransformerPolicy(VOCAB, hidden_size=32) if kind == "transformer" else
              HFPolicy(tiny_llama(VOCAB)))
    policy.eval()
    value_head = ValueHead(policy.hidden_size)
    engine = PlainEngine("cpu") if engine_name == "plain" else FastCPUEngine()
    engine.setup(policy, value_head, policy.reference_model(), OptimizerSettings(1e-2))
    return engine


def update(engine: Engine, batch: int) -> None:
    """One step on a batch of random tokens (each batch its own tokens, so that the fast
    engine's row-lazy AdamW sees rows with and without a gradient)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, VOCAB, (4, 10), generator=g)
    adv = torch.randn(4, T, generator=g)
    seqs = Sequences(ids, torch.ones_like(ids), T)
    policy, value_head = engine.trained["policy"], engine.trained["value_head"]
    with engine.update():
        engine.zero_grad()
        fwd = engine.forward_response(policy, seqs, 1.0)
        values = engine.value(value_head, fwd.hidden)                  # (B, T)
        loss = -(fwd.logprobs * adv).mean() + 0.5 * (values - adv).pow(2).mean()
        engine.backward(loss)
        assert engine.step().applied


def through_a_file(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.trained.state_dict().items()}


def moments(engine: Engine) -> list[torch.Tensor]:
    return [t for s in engine.optimizer.state_dict()["state"].values() for t in s.values()]


@pytest.mark.parametrize("kind", ["transformer", "llama"])
@pytest.mark.parametrize("engine_name", ["plain", "fast_cpu"])
def test_a_fresh_engine_given_the_state_makes_the_same_next_update(engine_name, kind):
    a = build(engine_name, kind, seed=0)
    update(a, 1)
    update(a, 2)
    b = build(engine_name, kind, seed=1)                 # other weights, a fresh optimizer
    assert any(not torch.equal(v, weights(b)[k]) for k, v in weights(a).items())
    assert set(a.state_dict()) == {"models", "optimizer"} and not a.sharded
    b.load_state_dict(through_a_file(a.state_dict()))
    # the control: the same weights, but a fresh optimizer
    c = build(engine_name, kind, seed=1)
    c.load_state_dict({"models": through_a_file(a.state_dict()["models"]),
                       "optimizer": c.state_dict()["optimizer"]})
    for engine in (a, b, c):
        update(engine, 3)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for x, y in zip(moments(a), moments(b), strict=True):
        assert torch.equal(x, y)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)   # (the optimizer's state counts)


def test_the_state_holds_the_live_tensors_and_loading_copies_them():
    """As torch's state dicts: the models' entries are the live weights (copy to hand them
    on), and loading copies into the engine's own tensors."""
    a, b = build("plain", "transformer", 0), build("plain", "transformer", 1)
    state = a.state_dict()
    live = dict(a.trained.named_parameters())
    assert all(state["models"][k].data_ptr() == p.data_ptr() for k, p in live.items())
    b.load_state_dict(state)
    update(a, 1)
    assert any(not torch.equal(p, b.trained.state_dict()[k]) for k, p in live.items())

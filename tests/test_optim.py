"""ppolm.engines.fast_cpu.optim.AdamW: the rows of lookup-only tables updated lazily, bitwise as
torch's AdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from ppolm.engines.fast_cpu import clipping
from ppolm.engines.fast_cpu.optim import AdamW

V, H = 40, 6


def make_params():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(V, H))
    dense = torch.nn.Parameter(torch.randn(5, 3))
    return table, dense


def written_rows(table):
    """The rows of the table's gradient that are nonzero (what GradBuffers.rows records)."""
    return table.grad.abs().sum(1).nonzero().squeeze(1)


def grads(step, table, dense):
    """Step ``step``'s gradients: a few table rows (none at step 3), a dense gradient."""
    gen = torch.Generator().manual_seed(100 + step)
    g = torch.zeros(V, H)
    if step != 3:
        rows = torch.randperm(V, generator=gen)[: 3 + step % 4]
        g[rows] = torch.randn(len(rows), H, generator=gen)
    table.grad = g
    dense.grad = torch.randn(5, 3, generator=gen)


def run(opt, table, dense, steps, start=0, factors=None):
    for i in range(start, start + steps):
        grads(i, table, dense)
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (1 + i)               # a schedule: lr changes every step
        factor = (factors or {}).get(i, 1.0)
        clipping.step_with_factor(opt, [table, dense], factor)


@pytest.mark.parametrize("with_rows", [True, False])
def test_lazy_rows_match_torch_adamw_bitwise(with_rows):
    table, dense = make_params()
    t2, d2 = copy.deepcopy(table), copy.deepcopy(dense)
    lazy = AdamW([table, dense], lr=1e-2, eps=1e-8, weight_decay=0.0, fused=True,
                 row_tables=[table], rows=written_rows if with_rows else None)
    plain = torch.optim.AdamW([t2, d2], lr=1e-2, eps=1e-8, weight_decay=0.0, fused=True)
    assert lazy.row_tables == [table]
    factors = {2: 0.5, 5: 0.25}                        # clipping through the fused grad_scale
    run(lazy, table, dense, 8, factors=factors)
    run(plain, t2, d2, 8, factors=factors)
    assert torch.equal(table, t2) and torch.equal(dense, d2)
    for p, q in ((table, t2), (dense, d2)):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(lazy.state[p][key], plain.state[q][key]), key
    # rows no gradient ever reached kept their values (and zero moments)
    untouched = lazy.state[table]["exp_avg_sq"].sum(1) == 0
    assert untouched.any()
    assert torch.equal(table[untouched], make_params()[0][untouched])


def test_state_dict_round_trip_and_resume_match_torch_adamw():
    table, dense = make_params()
    lazy = AdamW([table, dense], lr=1e-2, weight_decay=0.0, fused=True, row_tables=[table],
                 rows=written_rows)
    run(lazy, table, dense, 4)
    saved = copy.deepcopy(lazy.state_dict())
    weights = (table.detach().clone(), dense.detach().clone())

    t2, d2 = (torch.nn.Parameter(w.clone()) for w in weights)
    plain = torch.optim.AdamW([t2, d2], lr=1e-2, weight_decay=0.0, fused=True)
    plain.load_state_dict(copy.deepcopy(saved))        # the layout is plain AdamW's
    t3, d3 = (torch.nn.Parameter(w.clone()) for w in weights)
    resumed = AdamW([t3, d3], lr=1e-2, weight_decay=0.0, fused=True, row_tables=[t3],
                    rows=written_rows)
    resumed.load_state_dict(copy.deepcopy(saved))
    run(plain, t2, d2, 4, start=4)
    run(resumed, t3, d3, 4, start=4)
    assert torch.equal(t2, t3) and torch.equal(d2, d3)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(plain.state[t2][key], resumed.state[t3][key])


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.01), dict(fused=False),
                                    dict(amsgrad=True)])
def test_tables_take_the_plain_step_where_lazy_rows_would_not_be_exact(kwargs):
    table, dense = make_params()
    kwargs = {"fused": True, "weight_decay": 0.0, **kwargs}
    opt = AdamW([table, dense], lr=1e-2, **kwargs, row_tables=[table], rows=written_rows)
    assert opt.row_tables == []
    t2, d2 = copy.deepcopy(table), copy.deepcopy(dense)
    plain = torch.optim.AdamW([t2, d2], lr=1e-2, **kwargs)
    run(opt, table, dense, 3)
    run(plain, t2, d2, 3)
    assert torch.equal(table, t2) and torch.equal(dense, d2)


def test_trainer_updates_equal_plain_adamw_with_lazy_tables(tok):
    """Two iterations of the Trainer on the fast engine (a Llama with untied embeddings and a
    separate critic: two lookup-only tables) leave bitwise the same weights with the lazy rows
    as with every row updated."""
    from conftest import tiny_llama
    from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, ValueHead

    def trained(lazy: bool):
        torch.manual_seed(0)
        policy = HFPolicy(tiny_llama(len(tok)))
        env = TextGenerationEnv(["a", "abc", "hij", "bbbb"], tok,
                                CallableReward(lambda ps, rs: [r.count("a") / 8 for r in rs]),
                                max_new_tokens=6)
        cfg = PPOConfig(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=2, seed=0,
                        progress=False, max_grad_norm=0.05, engine="fast_cpu")
        trainer = Trainer(policy, env, cfg, value_head=ValueHead.separate(policy))
        optimizer = trainer.engine.optimizer
        assert isinstance(optimizer, AdamW) and len(optimizer.row_tables) == 2
        if not lazy:
            optimizer.row_tables = []
        trainer.train()
        return {**trainer.policy.state_dict(), **trainer.value_head.state_dict()}

    a, b = trained(True), trained(False)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_step_hooks_run_once_around_the_whole_step():
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])     # wraps torch's own step too
    table, dense = make_params()
    opt = AdamW([table, dense], lr=1e-2, weight_decay=0.0, fused=True, row_tables=[table],
                rows=written_rows)
    start = table.detach().clone()
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append(
        "post, table moved" if not torch.equal(table, start) else "post, table not moved"))
    grads(0, table, dense)
    opt.step()
    assert calls == ["pre", "post, table moved"]

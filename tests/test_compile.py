"""PPOConfig.compile (the fast CPU engine): the trunks' whole-sequence passes through
torch.compile give the eager numbers (up to float rounding), forward and backward, and the
Trainer's iteration with it the same update; decoding, and the policy outside the engine, stay
eager; clear errors where it cannot run."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from ppolm import (
    CallableReward,
    HFPolicy,
    LSTMPolicy,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    ValueHead,
)
from ppolm.engines.fast_cpu import engine as fast_engine
from ppolm.engines.fast_cpu.engine import check_compile
from ppolm.engines.fast_cpu.forward import forward_response, trunk_hidden
from ppolm.engines.fast_cpu.views import view_of
from ppolm.errors import ConfigError
from ppolm.policies.pretrained import freeze_lower_layers


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["llama", "transformer"])
def test_compiled_trunk_gives_the_eager_hidden_states_and_gradients(tok, kind):
    make = {"llama": lambda: HFPolicy(tiny_llama(len(tok))),
            "transformer": lambda: TransformerPolicy(len(tok), hidden_size=32)}[kind]
    torch.manual_seed(0)
    eager, compiled = make(), make()
    compiled.load_state_dict(eager.state_dict())
    views = {eager: view_of(eager), compiled: view_of(compiled)}
    assert views[compiled].compiles
    on_embeds = torch.compile(fast_engine.trunk_on_embeds)     # what the engine compiles
    ids = torch.randint(0, len(tok), (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                   # a left-padded row
    outs = []
    for policy in (eager, compiled):
        run = on_embeds if policy is compiled else None
        hidden = trunk_hidden(views[policy], ids, mask, on_embeds=run)
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        outs.append((hidden.detach(), {n: p.grad for n, p in policy.named_parameters()}))
    real = mask.bool()
    torch.testing.assert_close(outs[1][0][real], outs[0][0][real], rtol=1e-4, atol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the compiled path really ran: dynamo made a graph of the trunk
    graphs = unique_graphs()
    assert graphs >= 1
    # the response forward through it gives the eager logprobs (the same graph serves it)
    want = forward_response(views[eager], ids, mask, 4, 0.7)
    got = forward_response(views[compiled], ids, mask, 4, 0.7, on_embeds=on_embeds)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-5)
    assert unique_graphs() == graphs
    # outside the engine's function the policy is eager: no new graph, even for a new shape
    compiled.trunk(ids[:, :5], mask[:, :5])
    compiled(ids[:, :6], mask[:, :6], 2)
    assert unique_graphs() == graphs


def make_trainer(tok, compile, frozen=False, **overrides):
    cfg = dict(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=2, seed=0,
               learning_rate=1e-3, progress=False, device="cpu", engine="fast_cpu",
               compile=compile)
    cfg.update(overrides)
    env = TextGenerationEnv(["a", "abc", "hij", "bbbb"], tok,
                            CallableReward(lambda ps, rs: [r.count("a") / 8 for r in rs]),
                            max_new_tokens=6, seed=0)
    torch.manual_seed(0)
    policy = HFPolicy(tiny_llama(len(tok)))
    if frozen:         # embeddings and the lower layer frozen: the split trunk's path
        return Trainer(freeze_lower_layers(policy, 1), env, PPOConfig(**cfg))
    return Trainer(policy, env, PPOConfig(**cfg), value_head=ValueHead.separate(policy))


@pytest.mark.parametrize("frozen", [False, True], ids=["separate-critic", "frozen-lower-layer"])
def test_trainer_with_compile_makes_the_eager_update(tok, frozen):
    runs = []
    for compile in (False, True):
        trainer = make_trainer(tok, compile, frozen)
        assert trainer.engine.depth == (1 if frozen else 0)
        assert (trainer.engine.on_embeds is not None) == compile
        episodes, rollout = trainer.collect()
        advantages = trainer.compute_advantages(rollout)
        stats = trainer.update(rollout, advantages)
        runs.append((rollout, stats, {n: p.detach().clone()
                                      for n, p in trainer.policy.named_parameters()},
                     trainer.value_head.linear.weight.detach().clone()))
        # the trunks' passes went through compiled graphs (or, eager, through none), and the
        # policies are eager outside the engine (no new graph for a new shape)
        graphs = unique_graphs()
        assert (graphs > 0) == compile
        ids = rollout.input_ids[:2, :5]
        for model in (trainer.policy, trainer.reference, trainer.value_head.critic):
            if model is not None:
                model.trunk(ids, torch.ones_like(ids))
        assert unique_graphs() == graphs
    (r0, s0, w0, v0), (r1, s1, w1, v1) = runs
    # the same samples (decoding is eager), the compiled reference and critic give their numbers
    assert torch.equal(r0.input_ids, r1.input_ids)
    torch.testing.assert_close(r1.ref_logprobs, r0.ref_logprobs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r1.values, r0.values, rtol=1e-4, atol=1e-6)
    for key in ("loss", "policy_loss", "value_loss", "approx_kl", "clipfrac"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-3, abs=1e-6), key
    for name, w in w0.items():
        torch.testing.assert_close(w1[name], w, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-6)
    # ... and the update did move the weights, so the comparison above means something
    start = make_trainer(tok, False, frozen).policy
    assert max(float((w0[n] - p.detach()).abs().max()) for n, p in start.named_parameters()) > 1e-4


def test_compile_refused_for_a_policy_without_it(tok):
    lstm = view_of(LSTMPolicy(len(tok), hidden_size=8))
    assert not lstm.compiles
    with pytest.raises(ConfigError, match="LSTMPolicy does not support torch.compile"):
        check_compile(view_of(TransformerPolicy(len(tok), hidden_size=8)), lstm)
    check_compile(view_of(TransformerPolicy(len(tok), hidden_size=8)))     # no error
    env = TextGenerationEnv(["a"], tok, CallableReward(lambda ps, rs: [0.0] * len(rs)),
                            max_new_tokens=2)
    with pytest.raises(ConfigError, match="LSTMPolicy does not support torch.compile"):
        Trainer(LSTMPolicy(len(tok), hidden_size=8), env,
                PPOConfig(batch_size=2, minibatch_size=2, compile=True, progress=False,
                          device="cpu", engine="fast_cpu"))


def test_compile_on_cpu_refused_without_a_cpp_compiler(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))          # no compiler to be found
    monkeypatch.delenv("CXX", raising=False)
    env = TextGenerationEnv(["a"], tok, CallableReward(lambda ps, rs: [0.0] * len(rs)),
                            max_new_tokens=2)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        Trainer(HFPolicy(tiny_llama(len(tok))), env,
                PPOConfig(batch_size=2, minibatch_size=2, compile=True, progress=False,
                          device="cpu", engine="fast_cpu"))

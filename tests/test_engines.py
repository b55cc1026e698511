"""The engine seam: the plain engine (the reference) and the fast CPU engine give the same
training step, and each keeps the engine contract (clipped step, skipped non-finite steps,
state round trip, no gradient kept after an update)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from ppolm import (
    CallableReward,
    FastCPUEngine,
    HFPolicy,
    LSTMPolicy,
    PlainEngine,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    ValueHead,
)
from ppolm.engines import OptimizerSettings, Sequences
from ppolm.engines.fast_cpu.views import FastView
from ppolm.policies.base import Policy

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


class RunningMean(Policy):
    """A policy kind no engine knows: the mean of the embeddings so far, mixed by a linear layer
    (tanh), then a linear head. Written against the Policy contract alone (the cache: the sum
    and the count of the real tokens so far)."""

    def __init__(self, vocab_size: int, hidden_size: int = 16) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.max_length = vocab_size, hidden_size, None
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.mix = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, vocab_size)

    def trunk(self, input_ids, attention_mask, cache=None, use_cache=False):
        m = attention_mask[:, -input_ids.shape[1]:, None].float()          # (B, Lq, 1)
        total, count = cache if cache is not None else (0.0, 0.0)
        total = total + (self.embed(input_ids) * m).cumsum(1)             # (B, Lq, H)
        count = count + m.cumsum(1)                                       # (B, Lq, 1)
        hidden = torch.tanh(self.mix(total / count.clamp(min=1)))
        return hidden, ((total[:, -1:], count[:, -1:]) if use_cache else None)

    def head(self, hidden):
        return self.out(hidden)

    def save(self, path):
        torch.save(self.state_dict(), f"{path}/policy.pt")

    def load(self, path):
        self.load_state_dict(torch.load(f"{path}/policy.pt"))


def make_policy(kind, vocab):
    torch.manual_seed(0)
    return {"lstm": lambda: LSTMPolicy(vocab, hidden_size=32),
            "transformer": lambda: TransformerPolicy(vocab, hidden_size=32),
            "llama": lambda: HFPolicy(tiny_llama(vocab)),
            "custom": lambda: RunningMean(vocab)}[kind]()


def trained(kind, engine, tok, separate=False, **overrides):
    policy = make_policy(kind, len(tok))
    value_head = ValueHead.separate(policy) if separate else None
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=8)
    cfg = dict(iterations=1, batch_size=16, minibatch_size=8, ppo_epochs=2, seed=0,
               learning_rate=1e-3, progress=False, engine=engine)
    trainer = Trainer(policy, env, PPOConfig(**{**cfg, **overrides}), value_head=value_head)
    trainer.train()
    return trainer


@pytest.mark.parametrize(("kind", "separate", "source"), [
    ("transformer", False, "sampler"), ("transformer", True, "forward"),
    ("lstm", False, "sampler"), ("llama", False, "sampler"), ("llama", True, "forward"),
    ("custom", False, "sampler"), ("custom", True, "forward")])
def test_one_iteration_gives_the_same_weights_on_both_engines(kind, separate, source, tok):
    """Same seed, one iteration (rollout, 2 epochs x 2 minibatches): every trained tensor of
    the policy and the value head agrees within 1e-5 relative (its norm)."""
    plain = trained(kind, "plain", tok, separate, rollout_logprobs=source)
    fast = trained(kind, "fast_cpu", tok, separate, rollout_logprobs=source)
    assert isinstance(plain.engine, PlainEngine) and isinstance(fast.engine, FastCPUEngine)
    if kind == "custom":     # nothing written for the fast engine: its generic view runs it
        assert type(fast.engine.view(fast.policy)) is FastView and fast.engine.depth == 0
    start = make_policy(kind, len(tok)).state_dict()
    moved = 0
    for module in ("policy", "value_head"):
        a, b = getattr(plain, module).state_dict(), getattr(fast, module).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            rel = float((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12))
            assert rel <= 1e-5, f"{module}.{name}: {rel:.2e}"
            if module == "policy" and not torch.equal(a[name], start[name]):
                moved += 1
    assert moved > 0                                   # the update did move the weights
    for key in ("loss", "grad_norm", "approx_kl", "clipfrac"):
        assert plain.history[0][key] == pytest.approx(fast.history[0][key], rel=1e-4,
                                                      abs=1e-7), key
    assert abs(plain.history[0]["kl"] - fast.history[0]["kl"]) < 1e-5     # both ~0


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
def test_step_clips_to_the_global_norm_and_skips_non_finite(engine, tok):
    """A step with max_grad_norm c moves the weights as an unclipped step on the gradients
    scaled by c / norm (AdamW with a large eps, so its step depends on the gradient's scale);
    a non-finite gradient norm or loss skips the step and drops the gradients."""
    def setup(max_norm):
        policy = make_policy("transformer", len(tok))
        eng = (PlainEngine() if engine == "plain" else FastCPUEngine())
        eng.setup(policy, ValueHead(policy.hidden_size), make_policy("transformer", len(tok)),
                  OptimizerSettings(1e-2, adam_eps=1.0, max_grad_norm=max_norm))
        return policy, eng

    ids = torch.randint(4, len(tok), (4, 9))
    mask = torch.ones_like(ids)
    seqs = Sequences(ids, mask, 4)

    def loss_of(policy, eng, scale=1.0):
        return -eng.forward_response(policy, seqs, 1.0).logprobs.sum() * scale

    clipped, eng_c = setup(0.5)
    with eng_c.update():
        eng_c.zero_grad()
        eng_c.backward(loss_of(clipped, eng_c))
        result = eng_c.step()
    assert result.applied and result.grad_norm > 0.5
    scaled, eng_s = setup(None)
    with eng_s.update():
        eng_s.zero_grad()
        eng_s.backward(loss_of(scaled, eng_s, 0.5 / (result.grad_norm + 1e-6)))
        assert eng_s.step().applied
    unclipped, eng_u = setup(None)
    with eng_u.update():
        eng_u.zero_grad()
        eng_u.backward(loss_of(unclipped, eng_u))
        eng_u.step()
    gap = max(float((a - b).abs().max()) for a, b in zip(clipped.parameters(),
                                                         unclipped.parameters(), strict=True))
    assert gap > 1e-4                                  # clipping changes this step
    for a, b in zip(clipped.parameters(), scaled.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    # non-finite: skipped, nothing moves, no gradient kept
    before = [p.detach().clone() for p in clipped.parameters()]
    with eng_c.update():
        eng_c.zero_grad()
        eng_c.backward(loss_of(clipped, eng_c, float("nan")))
        skipped = eng_c.step()
        eng_c.zero_grad()
        eng_c.backward(loss_of(clipped, eng_c))
        refused = eng_c.step(loss_finite=False)
    assert not skipped.applied and math.isnan(skipped.grad_norm)
    assert not refused.applied
    assert all(torch.equal(a, b) for a, b in zip(clipped.parameters(), before, strict=True))
    assert all(p.grad is None for p in clipped.parameters())   # none kept after the update


def test_the_plain_engine_calls_models_through_their_forward(tok):
    """User hooks (and DDP/FSDP/PEFT wrappers, which work the same way) see every training
    forward of the plain engine; 'auto' picks it for several processes."""
    from ppolm.engines.factory import make_engine

    policy = make_policy("transformer", len(tok))
    calls = []
    policy.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=8)
    trainer = Trainer(policy, env, PPOConfig(iterations=1, batch_size=16, minibatch_size=8,
                                             ppo_epochs=2, engine="plain", progress=False,
                                             rollout_logprobs="forward"))
    trainer.train()
    # the rollout's forwards of the policy and of the reference (a copy, hook included),
    # then 2 epochs x 2 minibatches
    assert len(calls) == 2 + 2 * 2
    assert all(shape[0] in (16, 8) for shape in calls)
    # auto: the fast CPU engine in one CPU process, unless a switch only the plain one has is
    # on (several processes: tests/test_distributed.py)
    assert isinstance(make_engine(PPOConfig(), torch.device("cpu")), FastCPUEngine)
    assert isinstance(make_engine(PPOConfig(gradient_checkpointing=True), torch.device("cpu")),
                      PlainEngine)


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
def test_engine_state_round_trips(engine, tok):
    """The engine's state_dict (its optimizer) restores the exact next step."""
    a = trained("transformer", engine, tok, iterations=1)
    b = trained("transformer", engine, tok, iterations=1, seed=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))   # (as through a file: no shared tensors)
    a.config.iterations = b.config.iterations = 2
    a.train()
    b.train()
    for p, q in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(p, q)

"""bf16 autocast on CPU (PPOConfig.cpu_bf16, a fast CPU engine setting): the head's logits and
its input's gradient in bf16, its softmax and weight gradient in float32, attention and values
in float32, and the Trainer's use of it. (Its refusal on a CPU without bf16 is tested in
test_fast_cpu_settings.py, which no CPU skips.)"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

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
from ppolm.engines import FastCPUEngine
from ppolm.engines.fast_cpu.attention import cpu_bf16_supported, float32_attention
from ppolm.engines.fast_cpu.fused import head_logprobs
from ppolm.engines.fast_cpu.grad_buffers import accumulate_into_grad

pytestmark = pytest.mark.skipif(not cpu_bf16_supported(),
                                reason="this CPU has no bf16 support in PyTorch")
BF16 = torch.bfloat16


def bf16_head(hidden, weight, bias, tokens, temperature):
    """The head's maths under CPU autocast, written out: logits from bf16 operands (rounded to
    bf16, as the product returns them), log-softmax in float32."""
    s = 1.0 / temperature
    if bias is None:
        z = (weight.to(BF16) @ (hidden.to(BF16) * s).t()).float().t()
    else:
        z = torch.addmm(bias.to(BF16)[:, None], weight.to(BF16), hidden.to(BF16).t()).float().t()
        z = z * s
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1), logp


@pytest.mark.parametrize("with_bias", [False, True])
def test_head_under_cpu_autocast_runs_its_logits_and_input_gradient_in_bf16(with_bias):
    torch.manual_seed(0)
    R, H, V, T = 12, 32, 300, 0.7
    hidden = torch.randn(R, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True) if with_bias else None
    tokens = torch.randint(0, V, (R,))
    g = torch.randn(R)
    with torch.autocast("cpu", dtype=BF16):
        lp, ent = head_logprobs(hidden, weight, bias, tokens, T)
    (lp * g).sum().backward()                    # outside autocast, as the Trainer does

    want_lp, logp = bf16_head(hidden.detach(), weight.detach(),
                              None if bias is None else bias.detach(), tokens, T)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1), rtol=0, atol=2e-5)
    plain_lp = torch.log_softmax(F.linear(hidden, weight, bias) / T, -1).gather(
        -1, tokens[:, None]).squeeze(-1)
    assert (lp - plain_lp).abs().max() > 1e-4       # not the float32 products

    # d logp / dz = onehot - p (float32); d z / d h through the bf16 weight, d z / d W in
    # float32 against the float32 hidden state.
    grad_z = (F.one_hot(tokens, V).float() - logp.exp()) * g[:, None]
    if with_bias:
        grad_z = grad_z / T
        want_h = (grad_z.to(BF16) @ weight.detach().to(BF16)).float()
        want_w = grad_z.t() @ hidden.detach()
        torch.testing.assert_close(bias.grad, grad_z.sum(0), rtol=1e-2, atol=1e-3)
    else:
        want_h = (grad_z.to(BF16) @ weight.detach().to(BF16)).float() / T
        want_w = grad_z.t() @ (hidden.detach() / T)
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad, want_h, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad, want_w, rtol=1e-4, atol=1e-5)

    # With a gradient buffer the float32 weight's .grad receives the same, in place.
    before = torch.randn(V, H)
    weight.grad = before.clone()
    ptr = weight.grad.data_ptr()
    with accumulate_into_grad([weight]):
        with torch.autocast("cpu", dtype=BF16):
            lp, _ = head_logprobs(hidden, weight, bias, tokens, T)
        (lp * g).sum().backward()
    assert weight.grad.data_ptr() == ptr
    torch.testing.assert_close(weight.grad, before + want_w, rtol=1e-4, atol=1e-5)


def test_float32_attention_takes_sdpa_in_float32_and_restores_the_registry():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=BF16) for _ in range(3))
    module = tiny_llama(10).model.layers[0].self_attn
    with torch.autocast("cpu", dtype=BF16), float32_attention():
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, None, scaling=0.5,
                                                 is_causal=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.5,
                                          is_causal=True).transpose(1, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original

    # in a whole model under autocast: the attention's output (o_proj's input) is float32
    model = tiny_llama(10)
    seen: list[torch.dtype] = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].dtype))
    ids = torch.randint(0, 10, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        model(ids)
        with float32_attention():
            model(ids)
    assert seen == [BF16, torch.float32]


def test_value_head_gives_float32_values_under_autocast():
    """GAE and the value loss read the values: float32 (the head's product in float32), under
    autocast too."""
    head = ValueHead(16)
    hidden = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=BF16):
        values = head(hidden)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, head.linear(hidden).squeeze(-1))


def make_trainer(tok, kind="llama", separate=True, **overrides):
    cfg = dict(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=2, seed=0,
               progress=False, cpu_bf16=True, device="cpu", engine="fast_cpu")
    cfg.update(overrides)
    env = TextGenerationEnv(["a", "abc", "hij", "bbbb"], tok,
                            CallableReward(lambda ps, rs: [r.count("a") / 8 for r in rs]),
                            max_new_tokens=6)
    torch.manual_seed(0)
    policy = {"llama": lambda: HFPolicy(tiny_llama(len(tok))),
              "transformer": lambda: TransformerPolicy(len(tok), hidden_size=32),
              "lstm": lambda: LSTMPolicy(len(tok), hidden_size=32)}[kind]()
    value_head = ValueHead.separate(policy) if separate else None
    return Trainer(policy, env, PPOConfig(**cfg), value_head=value_head)


@pytest.mark.parametrize("kind,separate,overrides", [
    ("llama", True, {}),
    ("llama", False, {"ent_coef": 0.01}),                  # the head's plain (entropy) path
    ("llama", False, {"rollout_logprobs": "forward"}),
    ("transformer", False, {}),
    ("lstm", True, {}),
])
def test_trainer_with_cpu_bf16_trains_float32_weights(kind, separate, overrides, tok):
    trainer = make_trainer(tok, kind, separate, **overrides)
    assert isinstance(trainer.engine, FastCPUEngine) and trainer.engine.settings.cpu_bf16
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    history = trainer.train()
    after = trainer.policy.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for row in history:
        for key in ("reward_mean", "kl", "approx_kl", "value_loss", "loss"):
            assert math.isfinite(row[key]), key
    # the first minibatch's ratio is 1 up to bf16 rounding of the two passes
    assert history[0]["approx_kl"] < 1e-2


def test_frozen_weights_cast_once_per_sampling_block(tok):
    """Autocast keeps a weight's bf16 copy for the rest of its block only if the weight
    requires grad; the engine marks a frozen policy's weights for the (gradient-free)
    sampling block, so each is cast once there, not once per step, and unmarks them after."""
    from torch.profiler import profile

    from ppolm.policies.pretrained import freeze_lower_layers

    trainer = make_trainer(tok)
    engine = trainer.engine
    freeze_lower_layers(trainer.policy, 1)
    frozen = trainer.policy.model.model.layers[0].mlp.down_proj
    flags = {n: p.requires_grad for n, p in trainer.policy.named_parameters()}
    x = torch.randn(3, frozen.in_features)

    def casts(cached: bool) -> int:
        with profile(record_shapes=True) as prof, torch.no_grad(), engine.autocast():
            block = engine.casts_cached(trainer.policy) if cached else contextlib.nullcontext()
            with block:
                for _ in range(5):                              # five sampling steps
                    frozen(x)
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key == "aten::_to_copy" and e.input_shapes
                   and list(e.input_shapes[0]) == list(frozen.weight.shape))

    assert casts(cached=False) == 5
    assert casts(cached=True) == 1
    assert {n: p.requires_grad for n, p in trainer.policy.named_parameters()} == flags
    trainer.collect()
    assert {n: p.requires_grad for n, p in trainer.policy.named_parameters()} == flags

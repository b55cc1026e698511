"""The private torch and transformers APIs ppolm keeps (docs/performance.md, "Private APIs"):
each test fails with a message naming what changed, so that an upgrade that breaks one says
where to look instead of failing deep inside an engine."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn


def test_fused_adamw_kernel_matches_torchs_fused_adamw():
    # engines/fast_cpu/optim.py steps the touched rows of token tables with this kernel.
    kernel = getattr(torch, "_fused_adamw_", None)
    assert kernel is not None, ("torch._fused_adamw_ is gone: the fast engine's row AdamW "
                                "(engines/fast_cpu/optim.py) needs another kernel")
    torch.manual_seed(0)
    p, g = torch.randn(6, 4), torch.randn(6, 4)
    ref = nn.Parameter(p.clone())
    ref.grad = g.clone()
    opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                            fused=True)
    opt.step()
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
    step.add_(1)
    got = p.clone()
    kernel([got], [g], [m], [v], [], [step], amsgrad=False, lr=0.1, beta1=0.9, beta2=0.99,
           weight_decay=0.0, eps=1e-8, maximize=False, grad_scale=None, found_inf=None)
    torch.testing.assert_close(got, ref.detach(), rtol=0, atol=0,
                               msg="torch._fused_adamw_ no longer computes torch's fused AdamW "
                                   "step with these arguments")


def test_uncoalesced_sparse_indices_keep_repeats():
    # engines/fast_cpu/grad_buffers.py records the rows of a sparse embedding gradient before
    # autograd coalesces it; the public .indices() refuses an uncoalesced tensor.
    emb = nn.Embedding(10, 3, sparse=True)
    seen = []
    emb.weight.register_hook(lambda grad: seen.append(grad._indices()[0].clone()))
    emb(torch.tensor([[1, 4, 1]])).sum().backward()
    assert seen, "no sparse gradient reached the hook"
    assert sorted(seen[0].tolist()) == [1, 1, 4], (
        "Tensor._indices() of an uncoalesced sparse gradient changed: the fast engine's row "
        f"recording (engines/fast_cpu/grad_buffers.py) needs another way, got {seen[0]}")


def test_ddp_can_ignore_named_parameters():
    # engines/distributed.py keeps a separate critic's parameters out of the policy's DDP
    # wrapper (the critic's own wrapper reduces them).
    from torch.nn.parallel import DistributedDataParallel as DDP

    fn = getattr(DDP, "_set_params_and_buffers_to_ignore_for_model", None)
    assert fn is not None, ("DDP._set_params_and_buffers_to_ignore_for_model is gone: the "
                            "distributed engine's separate critic (engines/distributed.py) "
                            "needs another way to keep its parameters out of the policy's DDP")
    assert list(inspect.signature(fn).parameters)[:2] == ["module", "params_and_buffers_to_ignore"]


def test_transformers_attention_registry_accepts_a_local_sdpa_override():
    # engines/fast_cpu/attention.py runs SDPA in float32 under CPU autocast by overriding the
    # registry's 'sdpa' entry inside a block, and removes its override after.
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        pytest.fail("transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS is gone: the fast "
                    "engine's float32 attention (engines/fast_cpu/attention.py) needs the new "
                    "attention interface")
    default = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def mine(*args, **kwargs):
        return default(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = mine
    try:
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is mine
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is default, (
        "deleting a local 'sdpa' override no longer restores transformers' own SDPA")

    from ppolm.engines.fast_cpu.attention import float32_attention

    with float32_attention():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not default
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is default


def test_mkldnn_bf16_probe_answers():
    # engines/fast_cpu/attention.py: cpu_bf16_supported() asks oneDNN; without the probe it
    # answers False (cpu_bf16 refused), so a rename would silently turn bf16 off.
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    assert probe is not None, ("torch.ops.mkldnn._is_mkldnn_bf16_supported is gone: "
                               "cpu_bf16_supported() (engines/fast_cpu/attention.py) would "
                               "refuse cpu_bf16 everywhere")
    assert isinstance(bool(probe()), bool)


def test_mkldnn_packed_linear_operators_compute_a_linear_map():
    # engines/fast_cpu/packed.py packs the decoder's weights once per rollout with the first
    # and multiplies with the second (packed_weights); it is off where they are missing.
    from ppolm.engines.fast_cpu import packed

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    assert packed.available(), ("torch.ops.mkldnn._reorder_linear_weight or _linear_pointwise is "
                                "gone: engines/fast_cpu/packed.py needs another packed kernel")
    w, b, x = torch.randn(8, 5), torch.randn(8), torch.randn(3, 5)
    out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), b,
                                             "none", [], "")
    torch.testing.assert_close(out, nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5,
                               msg="torch.ops.mkldnn._linear_pointwise over a reordered weight "
                                   "no longer computes x @ w.T + b")


def test_optimizer_step_wrapper_exposes_the_plain_step():
    # engines/fast_cpu/optim.py calls AdamW.step without torch's hook wrapper, so its own
    # step (wrapped the same way) runs the optimizer hooks once.
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])      # torch wraps step at first use
    step = torch.optim.AdamW.step
    plain = getattr(step, "__wrapped__", None)
    assert plain is not None and plain is not step, (
        "torch.optim.AdamW.step no longer exposes __wrapped__: the fast engine's row AdamW "
        "(engines/fast_cpu/optim.py) would run the optimizer's step hooks twice")


def test_transformers_initialises_only_tensors_not_marked_initialised():
    # policies/pretrained.py (materialize) marks the parameters it reads from safetensors with
    # `_is_hf_initialized` and calls `initialize_weights()` for the buffers no file holds (the
    # rotary tables of a model built on the meta device).
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32)
    whole = LlamaForCausalLM(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(0.5)
        p._is_hf_initialized = True
    model.initialize_weights()
    assert all(bool((p == 0.5).all()) for p in model.parameters()), (
        "transformers' initialize_weights() no longer skips parameters marked "
        "_is_hf_initialized: policies/pretrained.py (materialize) needs another way to compute "
        "the rotary tables of a model built on the meta device")
    assert torch.equal(model.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq), (
        "initialize_weights() no longer computes the rotary tables: policies/pretrained.py "
        "(materialize) needs another way")

"""Decoding steps of Llama-family ``transformers`` models over a preallocated KV cache.

Why: a decoding step of a small model at batch 32 is short matrix products plus overhead, and
the overhead is large (docs/performance.md, "Decoding against its floor"): ``DynamicCache``
copies every layer's whole cache to grow it by one position (``torch.cat``), and each step
builds the attention mask again and goes through the attention dispatch of every layer. This
trunk runs the same modules (the norms, projections and MLP of each decoder layer are called as
they are, adapters included) but writes each step's keys and values into a buffer allocated
once per rollout, computes the rotary angles and the attention mask once per step for every
layer, and calls SDPA directly. With ``pack`` its matrix products (the head's too) run over
weights packed once for oneDNN (``packed.py``: float32 rounding, not bitwise).

A ``StepTrunk`` for ``ppolm.rollout.sampling.generate``: the prefill runs the model itself
(its ``DynamicCache`` is copied into the buffer), every later call runs ``step``. It is used only
where a probe (``decodes_like``) gives the model's own hidden states, to float32 rounding.
With ``depth`` it also keeps the input of decoder layer ``depth`` of every fed token, as
``BottomRecorder`` does (the frozen layers' output, from the same pass).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppolm.engines.fast_cpu.frozen import BottomRecorder
from ppolm.engines.fast_cpu.packed import linear as packed_linear
from ppolm.engines.fast_cpu.views import FastView, HFView
from ppolm.policies.base import positions_from_mask
from ppolm.policies.hf import decoder_layers

#: ``config.model_type`` of the families whose decoder layer this module runs: pre-norm RMSNorm,
#: rotary q/k projections (biases allowed), SDPA attention with grouped keys, a gated MLP.
FAMILIES = ("llama", "mistral", "qwen2")

#: Positions added to the buffer whenever it is full (and past the prompt at the start).
GROWTH = 64


@dataclass
class StaticKV:
    """The keys and values of every layer. Shapes: (layers, B, kv_heads, capacity, head_dim)
    each; positions [0, length) are filled."""

    keys: Tensor
    values: Tensor
    length: int

    def room(self, n: int) -> None:
        """Grow the buffer (a copy) so that ``n`` more positions fit."""
        need = self.length + n
        if need <= self.keys.shape[3]:
            return
        shape = list(self.keys.shape)
        shape[3] = need + GROWTH
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(shape)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)


def supported(view: FastView) -> TypeGuard[HFView]:
    """Whether ``view``'s policy is a ``transformers`` model of a family this trunk runs, with
    SDPA or eager attention and full attention in every layer."""
    if not isinstance(view, HFView):
        return False
    lm = view.policy.lm
    cfg = lm.config
    if getattr(cfg, "model_type", None) not in FAMILIES or getattr(cfg, "hidden_act", "") != "silu":
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    if getattr(cfg, "use_sliding_window", False) or (
            cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return False
    base = lm.base_model
    found = decoder_layers(base)
    return found is not None and hasattr(base, "rotary_emb") and hasattr(base, "norm")


class StaticDecoder(BottomRecorder):
    """A decoding-step trunk over a ``StaticKV`` buffer (see the module docstring).

    Shapes: ids (B, Lnew), mask (B, Lpast + Lnew) -> hidden (B, Lnew, H), the cache."""

    def __init__(self, view: HFView, depth: int = 0, pack: bool = False,
                 prefill_once: bool = False) -> None:
        super().__init__(view, depth)
        self.prefill_once = prefill_once
        self.lm = view.policy.lm
        base = self.lm.base_model
        found = decoder_layers(base)
        assert found is not None
        self.layers: list[Any] = list(found[1])      # decoder layers (modules)
        cfg = self.lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        attns = [layer.self_attn for layer in self.layers]
        self.qkv = [Projections([m.q_proj, m.k_proj, m.v_proj], pack) for m in attns]
        self.out = [Projections([m.o_proj], pack) for m in attns]
        self.mlp = [GatedMLP(layer.mlp, pack) for layer in self.layers]
        self.vocab = Projections([self.lm.get_output_embeddings()], pack)

    def head(self, hidden: Tensor) -> Tensor:
        """The policy's head (``HFPolicy.head``) through ``Projections``. Shapes: (B, H) ->
        (B, V)."""
        return self.vocab(hidden)[0]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
               ) -> Tensor:
        """SDPA with grouped keys, in the form the model's own attention takes for the same
        mask: ``enable_gqa`` without a mask; with one, a single query's heads folded onto
        their key head, or the keys repeated for every head. Shapes: q (B, h, n, d), k and v
        (B, kv, L, d) -> (B, h, n, d)."""
        rep = self.heads // self.kv_heads
        if rep == 1 or mask is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=rep > 1)
        B, h, n, d = q.shape
        if n == 1:
            folded = q.reshape(B, self.kv_heads, rep, d)
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
            return out.reshape(B, h, 1, d)
        k = k[:, :, None].expand(B, self.kv_heads, rep, *k.shape[2:]).reshape(B, h, -1, d)
        v = v[:, :, None].expand(B, self.kv_heads, rep, *v.shape[2:]).reshape(B, h, -1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def __call__(self, ids: Tensor, mask: Tensor, cache: Any) -> tuple[Tensor, Any]:
        if cache is None:
            return self.prefill(ids, mask)
        hidden = self.step(ids, mask, cache)
        return hidden, cache

    def prefill(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, StaticKV]:
        """The model itself over the prompts; its cache copied into a new buffer. With
        ``prefill_once``, a prompt that fills several rows (``samples_per_prompt``) is run once
        and its states copied to each of its rows."""
        rows = distinct_rows(ids, mask) if self.prefill_once else None

        def spread(t: Tensor) -> Tensor:            # a result of the rows run, to every row
            return t if rows is None else t[rows[1]]

        if rows is not None:
            ids, mask = ids[rows[0]], mask[rows[0]]
        if self.depth:
            hidden, bottom, dynamic = self.view.trunk_and_bottom(ids, mask, self.depth,
                                                                 use_cache=True)
            self.parts.append(spread(bottom))
        else:
            hidden, dynamic = self.view.policy.trunk(ids, mask, use_cache=True)
        hidden = spread(hidden)
        B, L = hidden.shape[0], ids.shape[1]
        shape = (len(self.layers), B, self.kv_heads, L + GROWTH, self.head_dim)
        keys = hidden.new_zeros(shape, dtype=torch.float32)
        values = torch.zeros_like(keys)
        for i, layer in enumerate(dynamic.layers):
            keys[i, :, :, :L] = spread(layer.keys)
            values[i, :, :, :L] = spread(layer.values)
        return hidden, StaticKV(keys, values, L)

    def step(self, ids: Tensor, mask: Tensor, cache: StaticKV) -> Tensor:
        """The decoder layers over the new tokens, their keys and values written into the
        buffer."""
        B, n = ids.shape
        past = cache.length
        cache.room(n)
        total = past + n
        base = self.lm.base_model
        x = base.embed_tokens(ids)                                       # (B, n, H)
        cos, sin = base.rotary_emb(x, positions_from_mask(mask)[:, past:])
        cos, sin = cos[:, None], sin[:, None]                            # (B, 1, n, d)
        # As the model's SDPA attention decides, so that the sums are the same: no mask where
        # no row is padded and one new token sees every key; else a key is seen if its row fed
        # it, and (among the new tokens) if it is not later.
        allowed: Tensor | None = None
        if n > 1 or not bool(mask.all()):
            allowed = mask[:, None, None, :].bool()                      # (B, 1, 1, total)
            if n > 1:
                later = torch.ones(n, total, dtype=torch.bool, device=ids.device).triu(past + 1)
                allowed = allowed & ~later
        for i, layer in enumerate(self.layers):
            if self.depth and i == self.depth:
                self.parts.append(x)
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self.qkv[i](h)
            q = q.view(B, n, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            cache.keys[i, :, :, past:total] = k
            cache.values[i, :, :, past:total] = v
            keys, values = cache.keys[i, :, :, :total], cache.values[i, :, :, :total]
            with torch.autocast(x.device.type, enabled=False):          # float32 attention
                a = self.attend(q.float(), keys, values, allowed, attn.scaling)
            x = x + self.out[i](a.transpose(1, 2).reshape(B, n, self.heads * self.head_dim))[0]
            x = x + self.mlp[i](layer.post_attention_layernorm(x))
        cache.length = total
        out: Tensor = base.norm(x)
        return out


class Projections:
    """Linear maps of the same input as one product when they are plain ``nn.Linear`` modules
    (their weights concatenated when made: once per rollout; with ``pack``, packed for oneDNN,
    ``packed.py``), else each module called (adapters included). Shapes: (..., H) -> one
    (..., out_i) per map."""

    def __init__(self, linears: list[Any], pack: bool = False) -> None:
        self.linears = linears
        self.sizes = [int(m.weight.shape[0]) for m in linears]
        self.product: Callable[[Tensor], Tensor] | None = None
        biases: list[Tensor] = [m.bias for m in linears
                                if type(m) is nn.Linear and m.bias is not None]
        if not all(type(m) is nn.Linear for m in linears) or len(biases) not in (0, len(linears)):
            return                                  # adapters, or some biased: call each
        with torch.no_grad():
            weight = joined([m.weight for m in linears])
            bias = joined(biases) if biases else None
            device = weight.device.type
            if torch.is_autocast_enabled(device):   # cast once, as autocast casts each call
                low = torch.get_autocast_dtype(device)
                weight = weight.to(low)
                bias = bias.to(low) if bias is not None else None
        self.product = packed_linear(weight, bias, pack)

    def __call__(self, x: Tensor) -> list[Tensor]:
        if self.product is None:
            return [m(x) for m in self.linears]
        out = self.product(x)
        return [out] if len(self.sizes) == 1 else list(out.split(self.sizes, dim=-1))


def joined(tensors: list[Tensor]) -> Tensor:
    """The tensors concatenated along their first dimension (a copy), or the one tensor itself
    (no copy)."""
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0].detach()


class GatedMLP:
    """``down(silu(gate(x)) * up(x))`` with gate and up as one product (``Projections``)."""

    def __init__(self, mlp: Any, pack: bool = False) -> None:
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj], pack)
        self.down = Projections([mlp.down_proj], pack)

    def __call__(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)[0]


def distinct_rows(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """The rows to run (the first of each distinct prompt, in order) and, for every row, which
    of them it copies; None when no prompt repeats. Shapes: ids, mask (B, L) -> (U,), (B,)."""
    seen: dict[tuple[int, ...], int] = {}
    first: list[int] = []
    copies: list[int] = []
    for row, key in enumerate(map(tuple, torch.cat([ids, mask], dim=1).tolist())):
        if key not in seen:
            seen[key] = len(first)
            first.append(row)
        copies.append(seen[key])
    if len(first) == len(copies):
        return None
    return (torch.tensor(first, device=ids.device), torch.tensor(copies, device=ids.device))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as Llama applies it (halves rotated). Shapes: (B, h, n, d)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


@torch.no_grad()
def decodes_like(view: HFView, device: torch.device | str, pack: bool = False) -> bool:
    """Whether ``StaticDecoder`` (with ``pack``) gives the model's own hidden states and logits
    on a probe: two left-padded prompts, then three steps (one row ending early) and a
    two-token feed."""
    policy = view.policy
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, policy.vocab_size, (2, 6), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ours_dec = StaticDecoder(view, pack=pack)
    ours, cache = ours_dec(ids, mask, None)
    theirs, dynamic = policy.trunk(ids, mask, use_cache=True)
    pairs = [(ours[mask.bool()], theirs[mask.bool()])]
    for alive, n in (([1, 1], 1), ([1, 0], 1), ([1, 0], 1), ([1, 1], 2)):
        new = torch.randint(0, policy.vocab_size, (2, n), generator=gen).to(device)
        mask = torch.cat([mask, torch.tensor([alive] * n, device=device).T], dim=1)
        ours, cache = ours_dec(new, mask, cache)
        theirs, dynamic = policy.trunk(new, mask, cache=dynamic, use_cache=True)
        fed = mask[:, -n:].bool()
        pairs.append((ours[fed], theirs[fed]))
    pairs.append((ours_dec.head(ours[:, -1]), policy.head(theirs[:, -1])))
    return all(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5) for a, b in pairs)

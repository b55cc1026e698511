"""A small GPT-style causal decoder (pre-LayerNorm, learned positions, tied embeddings)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppolm.errors import ConfigError
from ppolm.policies.base import TorchPolicy, positions_from_mask

KVCache = list[tuple[Tensor, Tensor]]   # per layer: keys and values (B, heads, Lpast, head_dim)


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, Lq, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, Lq, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))                               # (B, h, Lq, hd)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, h, Lq, hd)
        y = y.transpose(1, 2).reshape(B, Lq, d)
        x = x + self.drop(self.proj(y))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, (k, v)


class TransformerPolicy(TorchPolicy):
    """Causal decoder: token + position embeddings -> pre-LN blocks -> LayerNorm -> tied head.

    Args:
        vocab_size: number of token ids (``len(tokenizer)``).
        hidden_size: model width.
        n_layers: number of transformer blocks.
        n_heads: attention heads; must divide hidden_size.
        max_length: longest sequence (prompt + response) the position table covers.
        dropout: dropout probability (PPO keeps the model in eval mode, so it is off anyway).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 64, n_layers: int = 2,
                 n_heads: int = 4, max_length: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size % n_heads:
            raise ConfigError(f"hidden_size={hidden_size} is not divisible by n_heads={n_heads}.")
        if vocab_size <= 0 or n_layers <= 0 or max_length <= 0:
            raise ConfigError("vocab_size, n_layers and max_length must be > 0.")
        self.vocab_size, self.hidden_size, self.max_length = vocab_size, hidden_size, max_length
        self.arch = dict(vocab_size=vocab_size, hidden_size=hidden_size, n_layers=n_layers,
                         n_heads=n_heads, max_length=max_length, dropout=dropout)
        self.tok_emb = nn.Embedding(vocab_size, hidden_size)
        self.pos_emb = nn.Embedding(max_length, hidden_size)
        self.blocks = nn.ModuleList(_Block(hidden_size, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def trunk(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache | None = None,
              use_cache: bool = False) -> tuple[Tensor, KVCache | None]:
        past = attention_mask.shape[1] - input_ids.shape[1]
        pos = positions_from_mask(attention_mask)[:, past:]                 # (B, Lq)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)                     # (B, Lq, H)
        allowed = allowed_keys(attention_mask, input_ids.shape[1])          # (B, 1, Lq, Lk)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, allowed, cache[i] if cache is not None else None)
            new_cache.append(kv)
        return self.ln_f(x), (new_cache if use_cache else None)

    def layers(self) -> list[nn.Module]:
        return list(self.blocks)

    def select_cache(self, cache: KVCache, rows: Tensor) -> KVCache:
        return [(k[rows], v[rows]) for k, v in cache]

    def head(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)


def allowed_keys(attention_mask: Tensor, new: int) -> Tensor:
    """Which keys each of the ``new`` last queries may attend to: query i (absolute position
    past + i) sees real keys j <= past + i, and always itself, so rows of left padding never
    attend to nothing (which would give NaN). Shapes: (B, Lk) -> (B, 1, new, Lk) bool."""
    Lk = attention_mask.shape[1]
    q_idx = torch.arange(new, device=attention_mask.device)[:, None] + (Lk - new)
    k_idx = torch.arange(Lk, device=attention_mask.device)[None, :]
    allowed = (k_idx <= q_idx) & attention_mask.bool()[:, None, :]           # (B, new, Lk)
    return (allowed | (k_idx == q_idx)).unsqueeze(1)

"""Batched sampling with a cache: temperature, top-k, top-p, stop at EOS."""

from __future__ import annotations

import torch
from torch import Tensor

from ppolm.policies.base import Policy


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask all but the top-k tokens and the smallest set whose probability reaches top_p.

    Shapes: (B, V) -> (B, V), with -inf on removed tokens. top_k=0 and top_p=1 keep all.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # keep the first
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(policy: Policy, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
           eos_token_id: int | None, pad_token_id: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor]:
    """Sample up to ``max_new_tokens`` per row, stopping a row at its first EOS.

    Stops early once every row has ended. Tokens after a row's EOS are ``pad_token_id`` and
    masked out; the EOS itself is a response token (an action the policy took).

    Shapes: input_ids, attention_mask (B, P) left-padded -> response ids (B, T),
    response mask (B, T) with T <= max_new_tokens.
    """
    B = input_ids.shape[0]
    hidden, cache = policy.trunk(input_ids, attention_mask, use_cache=True)
    logits = policy.head(hidden[:, -1]).float()                      # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    mask = attention_mask
    tokens, alive_cols = [], []
    for step in range(max_new_tokens):
        probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        alive = ~done
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        alive_cols.append(alive)
        if eos_token_id is not None:
            done = done | (alive & (nxt == eos_token_id))
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, alive.to(mask.dtype)[:, None]], dim=1)
        hidden, cache = policy.trunk(nxt[:, None], mask, cache=cache, use_cache=True)
        logits = policy.head(hidden[:, -1]).float()
    return torch.stack(tokens, 1), torch.stack(alive_cols, 1).long()

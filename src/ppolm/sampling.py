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


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from ``probs`` (rows summing to about 1), by inverse CDF.

    The cumulative sum is taken in float64, so every token is drawn with its own probability
    (to float32 rounding of ``probs``) and a zero-probability token never. About 7x faster than
    ``torch.multinomial`` on CPU for a 49k vocabulary, which draws an exponential per token.

    Shapes: (B, V) -> (B,) long.
    """
    cdf = probs.cumsum(-1, dtype=torch.float64)                      # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64,
                   device=probs.device) * cdf[:, -1:]                # (B, 1) in [0, total)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(policy: Policy, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
           eos_token_id: int | None, pad_token_id: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor]:
    """Sample up to ``max_new_tokens`` per row, stopping a row at its first EOS.

    Stops early once every row has ended; with ``eos_token_id=None`` every row gets exactly
    ``max_new_tokens`` tokens. Tokens after a row's EOS are ``pad_token_id`` and masked out; the
    EOS itself is a response token (an action the policy took).

    One forward step per new token over the cache; only the last position is projected to the
    vocabulary.

    Shapes: input_ids, attention_mask (B, P) left-padded -> response ids (B, T),
    response mask (B, T) with T <= max_new_tokens.
    """
    B = input_ids.shape[0]
    device = input_ids.device
    hidden, cache = policy.trunk(input_ids, attention_mask, use_cache=True)
    logits = next_logits(policy, hidden[:, -1])                      # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # The attention mask grows one column per step: preallocated, filled as rows stay alive.
    P = attention_mask.shape[1]
    mask = torch.cat([attention_mask, attention_mask.new_zeros(B, max_new_tokens)], dim=1)
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    alive_cols = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    steps = max_new_tokens
    for step in range(max_new_tokens):
        if temperature != 1.0:
            logits.div_(temperature)
        probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
        nxt = draw(probs, generator)                                  # (B,)
        alive = ~done
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
        tokens[:, step] = nxt
        alive_cols[:, step] = alive
        if eos_token_id is not None:
            done = done | (alive & (nxt == eos_token_id))
            if bool(done.all()):
                steps = step + 1
                break
        if step == max_new_tokens - 1:
            break
        mask[:, P + step] = alive
        hidden, cache = policy.trunk(nxt[:, None], mask[:, : P + step + 1], cache=cache,
                                     use_cache=True)
        logits = next_logits(policy, hidden[:, -1])
    return tokens[:, :steps], alive_cols[:, :steps]


def next_logits(policy: Policy, hidden: Tensor) -> Tensor:
    """float32 logits of the next token. Shapes: (B, H) -> (B, V).

    With a linear head on CPU, computed as ``(W @ h.T).T``: the same numbers, but BLAS runs the
    tall-skinny product of a decoding step (a few rows against a 49k-row matrix) about 25%
    faster than ``h @ W.T`` on the 2-core benchmark machine.
    """
    params = policy.head_params()
    if params is None or hidden.device.type != "cpu" or params[0].dtype != hidden.dtype:
        return policy.head(hidden).float()
    weight, bias = params
    logits = (weight @ hidden.t()).t()
    if bias is not None:
        logits = logits + bias
    return logits.float().contiguous()

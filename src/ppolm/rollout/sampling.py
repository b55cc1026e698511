"""Batched sampling with a cache: temperature, top-k, top-p, stop at EOS (one id or several);
optionally keeping what PPO's rollout needs from the same forward steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


# One decoding step of a trunk: (new ids (B, Lnew), attention mask (B, Lpast + Lnew), cache)
# -> (hidden states (B, Lnew, H), the updated cache). One with a ``head`` attribute (hidden
# (B, H) -> logits (B, V)) has the next-token logits computed by it instead of ``policy.head``.
StepTrunk = Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]]

# Tokens per block of the two-level inverse CDF in ``draw``.
_DRAW_BLOCK = 1024


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from ``probs`` (rows summing to about 1), by inverse CDF.

    Two levels, sums in float64: the CDF over blocks of 1024 tokens picks a block, the CDF
    inside that block a token, so every token is drawn with its own probability (to float32
    rounding of ``probs``) and a zero-probability token never. The same token as one float64
    cumulative sum over the whole row would give for the same uniform draw (to float64
    rounding), faster: a cumulative sum runs one element at a time, and here it covers
    V / 1024 + 1024 elements of a row. ``torch.multinomial`` on CPU draws an exponential per
    token, slower still (figures in docs/performance.md).

    Shapes: (B, V) -> (B,) long.
    """
    B, V = probs.shape
    n = -(-V // _DRAW_BLOCK)                                         # blocks
    padded = probs if n * _DRAW_BLOCK == V else torch.nn.functional.pad(
        probs, (0, n * _DRAW_BLOCK - V))
    blocks = padded.reshape(B, n, _DRAW_BLOCK)
    mass = blocks.sum(-1, dtype=torch.float64)                       # (B, n)
    cdf = mass.cumsum(-1)                                            # (B, n)
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64,
                   device=probs.device) * cdf[:, -1:]                # (B, 1) in [0, total)
    k = torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)     # (B, 1) the block
    inside = blocks.gather(1, k[:, :, None].expand(B, 1, _DRAW_BLOCK)).squeeze(1)
    icdf = inside.cumsum(-1, dtype=torch.float64)                    # (B, block)
    # u's place inside the block, kept below the block's total (rounding of the two sums), so
    # the token found has probability > 0.
    rest = (u - (cdf.gather(1, k) - mass.gather(1, k))).clamp_(min=0)
    rest = torch.minimum(rest, torch.nextafter(icdf[:, -1:], torch.zeros_like(rest)))
    j = torch.searchsorted(icdf, rest, right=True).clamp_(max=_DRAW_BLOCK - 1)
    return (k * _DRAW_BLOCK + j).squeeze(1).clamp_(max=V - 1)


@dataclass(frozen=True)
class Past:
    """What decoding leaves for a continuation of the same rows (``generate(keep=True)``): the
    cache of every token fed so far, its attention mask (0 where a row fed nothing: the holes
    of rows that ended early or had less to feed), and each row's state after its last fed
    token (the next-token state of a row that feeds nothing more).

    The last token drawn in a pass is not in the cache (no step ran after it): a continuation
    feeds it first. Shapes: mask (B, Lc) long, Lc the cache's length; last (B, H)."""

    cache: Any
    mask: Tensor
    last: Tensor


@dataclass(frozen=True)
class Sampled:
    """What one sampling pass gives: the responses, and (with ``record=True``) what PPO's rollout
    needs from the policy, read off the same forward steps so no second forward pass is run.

    Shapes: B rows, P prompt tokens, T response tokens, H hidden size.
    """

    tokens: Tensor                  # (B, T) response ids, pad_token_id after a row's EOS
    mask: Tensor                    # (B, T) long, 1 up to and including EOS
    logprobs: Tensor | None = None  # (B, T) log pi(token) at the temperature (before top-k/p)
    hidden: Tensor | None = None    # (B, T, H) trunk states at the positions predicting them
    past: Past | None = None        # with keep=True: what a continuation starts from


def stop_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device
                ) -> Tensor | None:
    """The ids that end a row, as a 1-D long tensor on ``device``; None for none (no id, or an
    empty sequence): rows then never stop early."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.tensor([int(i) for i in ids], dtype=torch.long, device=device)


@torch.no_grad()
def sample(policy: Policy, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
           eos_token_id: int | Sequence[int] | None, pad_token_id: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor]:
    """Sample up to ``max_new_tokens`` per row, stopping a row at its first EOS (any of the ids
    when ``eos_token_id`` is a sequence).

    Shapes: input_ids, attention_mask (B, P) left-padded -> response ids (B, T),
    response mask (B, T) with T <= max_new_tokens. See ``generate``.
    """
    out = generate(policy, input_ids, attention_mask, max_new_tokens, eos_token_id,
                   pad_token_id, temperature, top_k, top_p, generator)
    return out.tokens, out.mask


@torch.no_grad()
def generate(policy: Policy, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None, pad_token_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, record: bool = False,
             trunk: StepTrunk | None = None, past: Past | None = None,
             keep: bool = False) -> Sampled:
    """Sample up to ``max_new_tokens`` per row, stopping a row at its first EOS.

    ``eos_token_id`` is one id or a sequence of ids (models whose generation config lists
    several end-of-sequence tokens): a row stops at the first token that is any of them. Stops
    early once every row has ended; with ``eos_token_id=None`` (or an empty sequence) every row
    gets exactly ``max_new_tokens`` tokens. Tokens after a row's EOS are ``pad_token_id`` and
    masked out; the EOS itself is a response token (an action the policy took).

    One forward step per new token over the cache; only the last position is projected to the
    vocabulary. With ``record=True`` the logprob of each drawn token (under the tempered,
    unfiltered distribution, as a forward pass over the finished sequences computes it) and the
    trunk state that predicted it are kept. They equal a forward pass over the finished
    sequences up to float rounding (the cache sums in another order).

    ``trunk`` replaces ``policy.trunk`` for the decoding steps (an engine that keeps something
    from them passes its own; it must return what ``policy.trunk`` would, and its ``head``,
    if it has one, what ``policy.head`` would).

    ``keep=True`` also returns the ``Past`` (the cache); given as ``past``, the rows go on from
    it: ``input_ids`` are then only the new tokens after the cached ones (the previous pass's
    last drawn token, then whatever came after it), so a continuation costs its own tokens, not
    the whole sequence again. A row may have no new token (all of its mask 0): its next token
    comes from its ``past.last`` state.

    Shapes: input_ids, attention_mask (B, P) left-padded (with ``past``: (B, Lnew), may be
    empty) -> ``Sampled`` with T <= max_new_tokens.
    """
    B = input_ids.shape[0]
    device = input_ids.device
    stops = stop_tensor(eos_token_id, device)                         # (S,) or None

    def step_forward(ids: Tensor, mask: Tensor, cache: Any) -> tuple[Tensor, Any]:
        if trunk is not None:
            return trunk(ids, mask, cache)
        return policy.trunk(ids, mask, cache=cache, use_cache=True)

    # the trunk's own head where it has one (the same map, e.g. over weights packed for it)
    head: Callable[[Tensor], Tensor] = getattr(trunk, "head", None) or policy.head
    hiddens: list[Tensor] = []                                        # (B, H) each
    logprobs: list[Tensor] = []                                       # (B,) each
    if past is None:
        hidden, cache = step_forward(input_ids, attention_mask, None)
        state = hidden[:, -1]                                         # (B, H)
    else:
        attention_mask = torch.cat([past.mask, attention_mask], dim=1)
        state, cache = past.last, past.cache
        if input_ids.shape[1]:
            hidden, cache = step_forward(input_ids, attention_mask, cache)
            fed = attention_mask[:, -1].bool()[:, None]               # left-padded: any new
            state = torch.where(fed, hidden[:, -1], state)
    last = state                                                      # after the last fed token
    logits = next_logits(head, state)                                 # (B, V)
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
        if record:
            hiddens.append(state)
            if top_k or top_p < 1.0:        # the logprob under the unfiltered distribution
                logprobs.append(logits.gather(1, nxt[:, None]).squeeze(1)
                                - torch.logsumexp(logits, dim=-1))
            else:                           # the softmax drawn from is that distribution
                logprobs.append(probs.gather(1, nxt[:, None]).squeeze(1).log())
        alive = ~done
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
        tokens[:, step] = nxt
        alive_cols[:, step] = alive
        if stops is not None:
            done = done | (alive & torch.isin(nxt, stops))
            if bool(done.all()):
                steps = step + 1
                break
        if step == max_new_tokens - 1:
            break
        mask[:, P + step] = alive
        hidden, cache = step_forward(nxt[:, None], mask[:, : P + step + 1], cache)
        state = hidden[:, -1]
        if keep:
            last = torch.where(alive[:, None], state, last)
        logits = next_logits(head, state)
    # (the last drawn token was not fed: the cache holds P + steps - 1 positions)
    kept = Past(cache, mask[:, : P + steps - 1], last) if keep else None
    if not record:
        return Sampled(tokens=tokens[:, :steps], mask=alive_cols[:, :steps], past=kept)
    return Sampled(tokens=tokens[:, :steps], mask=alive_cols[:, :steps],
                   logprobs=torch.stack(logprobs, 1), hidden=torch.stack(hiddens, 1), past=kept)


def next_logits(head: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
    """float32 logits of the next token from the policy's ``head``. Shapes: (B, H) -> (B, V)."""
    return head(hidden).float()

"""The fast engine's forward pass over the response tokens: the LM head fused with the logprobs
(``fused.head_logprobs``: no logits kept), optionally from the output of frozen lower layers
computed once per rollout, optionally through a compiled trunk."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ppolm.engines.base import ResponseForward
from ppolm.engines.fast_cpu.fused import head_logprobs
from ppolm.engines.fast_cpu.views import FastView
from ppolm.maths.losses import token_entropy, token_logprobs
from ppolm.policies.base import response_slice

# A whole-sequence trunk pass from input embeddings: (view, embeds (B, L, H), mask (B, L))
# -> hidden (B, L, H); ``torch.compile`` of it, or None for the eager trunk.
OnEmbeds = Callable[[FastView, Tensor, Tensor], Tensor]


def trunk_hidden(view: FastView, input_ids: Tensor, attention_mask: Tensor,
                 bottom: Tensor | None = None, depth: int = 0,
                 on_embeds: OnEmbeds | None = None) -> Tensor:
    """The hidden states of the trunk of ``view``'s policy over whole sequences: from ``bottom``
    (the output of the lower ``depth`` blocks) when given, through ``on_embeds`` when given
    (the token lookup stays outside it, where the update makes its gradient sparse).
    Shapes: (B, L) -> (B, L, H)."""
    if bottom is not None:
        run = (lambda e, m: on_embeds(view, e, m)) if on_embeds is not None else None
        return view.trunk_top(bottom, input_ids, attention_mask, depth, on_embeds=run)
    if on_embeds is not None:
        return on_embeds(view, view.input_embeds(input_ids, attention_mask), attention_mask)
    hidden, _ = view.policy.trunk(input_ids, attention_mask)
    return hidden


def forward_response(view: FastView, input_ids: Tensor, attention_mask: Tensor,
                     response_len: int, temperature: float, entropy_grad: bool = False,
                     full_dist: bool = False, bottom: Tensor | None = None, depth: int = 0,
                     on_embeds: OnEmbeds | None = None) -> ResponseForward:
    """Logprobs of the last ``response_len`` tokens of each row, under ``view``'s policy.

    Only the positions predicting response tokens are projected to the vocabulary, with the
    logits divided by ``temperature`` as when sampling. Unless the entropy is part of the loss
    (``entropy_grad``) or the whole distribution is asked for (``full_dist``), a policy with a
    linear head gets logprobs and entropy from the fused head, which keeps no logits.

    Shapes: input_ids, attention_mask (B, L), bottom (B, L, H); returns (B, T) logprobs and
    entropy, (B, T, H) hidden.
    """
    T = response_len
    hidden = trunk_hidden(view, input_ids, attention_mask, bottom, depth, on_embeds)
    hidden = response_slice(hidden, T)                                 # (B, T, H)
    B, H = hidden.shape[0], hidden.shape[2]
    L = input_ids.shape[1]
    flat = hidden.reshape(B * T, H)                                    # (B*T, H), contiguous
    tokens = input_ids[:, L - T:].reshape(B * T)                       # (B*T,)
    params = view.head_params()
    if full_dist:
        logits = view.policy.head(flat).float() / temperature           # (B*T, V)
        dist = torch.log_softmax(logits, dim=-1)
        logprobs = dist.gather(-1, tokens[:, None]).squeeze(-1)
        return ResponseForward(logprobs=logprobs.view(B, T),
                               entropy=token_entropy(dist).view(B, T), hidden=hidden,
                               dist=dist.view(B, T, -1))
    if params is not None and not entropy_grad:
        logprobs, entropy = head_logprobs(flat, params[0], params[1], tokens, temperature)
    else:
        logits = view.policy.head(flat).float() / temperature           # (B*T, V)
        logprobs = token_logprobs(logits, tokens)
        entropy = token_entropy(torch.log_softmax(logits, dim=-1))
    return ResponseForward(logprobs=logprobs.view(B, T), entropy=entropy.view(B, T),
                           hidden=hidden)

"""The one interface every policy implements, and the forward pass PPO needs from it.

A policy maps token ids to hidden states (its *trunk*) and hidden states to next-token logits (its
*head*). Splitting the two lets a value head share the trunk (one forward for policy and value)
and lets PPO project only the response positions to the vocabulary.

Padding convention: prompts are left-padded, responses right-padded after EOS, so the real tokens
of a row are contiguous. Position ids are derived from the attention mask
(``cumsum(mask) - 1``), which makes a sequence's logits independent of its padding.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ppolm.errors import CheckpointError, ConfigError, DataError
from ppolm.maths.losses import token_entropy
from ppolm.engines.fast_cpu.fused import head_logprobs


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that follow the padding. Shapes: (B, L) -> (B, L), long, 0 on left pads."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Policy(nn.Module, ABC):
    """A causal language model: ``trunk`` (ids -> hidden states) then ``head`` (-> logits).

    Subclasses set ``vocab_size``, ``hidden_size`` and ``max_length`` (None if unbounded).
    """

    vocab_size: int
    hidden_size: int
    max_length: int | None
    # Whether ``trunk`` can run its whole-sequence passes through torch.compile, and whether it
    # does now (inside ``compiled_trunks``).
    supports_compile: bool = False
    _compiled_trunk: bool = False

    @abstractmethod
    def trunk(self, input_ids: Tensor, attention_mask: Tensor, cache: Any = None,
              use_cache: bool = False) -> tuple[Tensor, Any]:
        """Hidden states of the new tokens, and the updated cache (None unless use_cache).

        Shapes: input_ids (B, Lnew); attention_mask (B, Lpast + Lnew), covering the cached
        tokens too; returns hidden (B, Lnew, H).
        """

    @abstractmethod
    def head(self, hidden: Tensor) -> Tensor:
        """Next-token logits. Shapes: (..., H) -> (..., V)."""

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        """(weight (V, H), bias (V,) or None) when ``head`` is one linear map, else None.

        With them, ``forward_response`` computes logprobs without keeping the logits (see
        ``ppolm.engines.fast_cpu.fused``) and the sampler projects with them directly; None falls back
        to ``head``. A subclass that overrides ``head`` must return None here (the built-in
        policies do so by themselves).
        """
        return None

    def frozen_depth(self) -> int:
        """How many of the trunk's lower blocks (embeddings included) have no trainable
        parameter, so their output is a fixed function of the tokens (0: none, or a policy
        that cannot split its trunk). The Trainer then computes it once per rollout."""
        return 0

    def trunk_bottom(self, input_ids: Tensor, attention_mask: Tensor, depth: int) -> Tensor:
        """Hidden states after the embeddings and the first ``depth`` blocks, for every
        position. Shapes: (B, L), (B, L) -> (B, L, H)."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its trunk.")

    def trunk_top(self, bottom: Tensor, input_ids: Tensor, attention_mask: Tensor, depth: int
                  ) -> Tensor:
        """The rest of the trunk on ``trunk_bottom``'s output: ``trunk_top(trunk_bottom(x))``
        equals ``trunk(x)``. Shapes: bottom (B, L, H), input_ids, attention_mask (B, L)
        -> (B, L, H)."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its trunk.")

    def trunk_and_bottom(self, input_ids: Tensor, attention_mask: Tensor, depth: int,
                         cache: Any = None, use_cache: bool = False
                         ) -> tuple[Tensor, Tensor, Any]:
        """``trunk`` that also returns ``trunk_bottom``'s output for the new tokens, from the
        same pass (the sampler keeps it, so the rollout needs no forward of its own).

        Shapes: as ``trunk``; returns hidden (B, Lnew, H), bottom (B, Lnew, H), cache."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its trunk.")

    def bottom_parameters(self, depth: int) -> list[Tensor]:
        """The parameters ``trunk_bottom(..., depth)`` uses, in a fixed order (to check that a
        reference model shares them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its trunk.")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits for every position. Shapes: (B, L), (B, L) -> (B, L, V)."""
        hidden, _ = self.trunk(input_ids, attention_mask)
        return self.head(hidden)

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the weights (and whatever is needed to rebuild the policy) under ``path``."""

    @abstractmethod
    def load(self, path: str | Path) -> None:
        """Load weights written by ``save`` into this policy."""


@contextlib.contextmanager
def compiled_trunks(*policies: Policy | None) -> Iterator[None]:
    """While the block runs, the trunks' whole-sequence passes (no cache) of ``policies`` go
    through ``torch.compile``; decoding steps stay eager. The Trainer wraps its rollout's
    forward passes and its update in it (``PPOConfig.compile``), so evaluation and other uses
    outside stay eager and make no graphs of their own."""
    found = [p for p in policies if p is not None]
    before = [p._compiled_trunk for p in found]
    for p in found:
        if not p.supports_compile:
            raise ConfigError(f"{type(p).__name__} does not support torch.compile of its trunk.")
        p._compiled_trunk = True
    try:
        yield
    finally:
        for p, b in zip(found, before, strict=True):
            p._compiled_trunk = b


_COMPILED: dict[Callable[..., Any], Any] = {}


def compiled(fn: Callable[..., Any]) -> Any:
    """``fn`` through ``torch.compile``, made on first use and shared by every policy that
    calls it (each model, grad mode and shape gets its own graph, as compile guards)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def check_ids(policy: Policy, input_ids: Tensor, attention_mask: Tensor) -> None:
    """Clear errors for inputs a policy cannot take (instead of an index error deep in torch)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise DataError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                        f"{tuple(attention_mask.shape)} must both be (B, L).")
    top = int(input_ids.max()) if input_ids.numel() else 0
    if top >= policy.vocab_size or (input_ids.numel() and int(input_ids.min()) < 0):
        raise DataError(f"token id {top} is outside the policy's vocabulary of "
                        f"{policy.vocab_size}: the tokenizer and the policy disagree.")
    if policy.max_length is not None and input_ids.shape[1] > policy.max_length:
        raise DataError(f"sequence of {input_ids.shape[1]} tokens exceeds the policy's "
                        f"max_length of {policy.max_length}.")


@dataclass(frozen=True)
class ResponseForward:
    """What one forward pass gives PPO about the response tokens."""

    logprobs: Tensor       # (B, T) log-probability of each response token, at the temperature
    entropy: Tensor        # (B, T) entropy of each token's distribution, at the temperature
    hidden: Tensor         # (B, T, H) trunk hidden states at the positions predicting them
    dist: Tensor | None = None  # (B, T, V) log-softmax over the vocabulary, when asked for


def samples_bottom(policy: Policy) -> bool:
    """Whether the policy can return its frozen layers' output from its sampling steps
    (it implements ``trunk_and_bottom``)."""
    return type(policy).trunk_and_bottom is not Policy.trunk_and_bottom


@torch.no_grad()
def frozen_split(policy: Policy, reference: Policy | None, device: torch.device | str,
                 enabled: bool = True) -> tuple[int, bool]:
    """The depth of the policy's frozen lower layers that can run once per batch (0: none), and
    whether ``reference`` has the same lower layers (then it can reuse their output too).
    A split is used only if, on a probe, it gives the whole trunk's hidden states."""
    depth = policy.frozen_depth() if enabled else 0
    if depth == 0:
        return 0, False
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, policy.vocab_size, (2, 6), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                     # a left-padded row
    whole, _ = policy.trunk(ids, mask)
    split = policy.trunk_top(policy.trunk_bottom(ids, mask, depth), ids, mask, depth)
    real = mask.bool()
    if not torch.allclose(whole[real], split[real], rtol=1e-4, atol=1e-5):
        return 0, False
    if reference is None:
        return depth, False
    try:
        ours = policy.bottom_parameters(depth)
        theirs = reference.bottom_parameters(depth)
    except NotImplementedError:
        return depth, False
    shared = len(ours) == len(theirs) and all(
        a.shape == b.shape and torch.equal(a, b.to(a.device))
        for a, b in zip(ours, theirs, strict=True))
    return depth, shared


def forward_response(policy: Policy, input_ids: Tensor, attention_mask: Tensor,
                     response_len: int, temperature: float, entropy_grad: bool = False,
                     full_dist: bool = False, bottom: Tensor | None = None, depth: int = 0
                     ) -> ResponseForward:
    """Logprobs of the last ``response_len`` tokens of each row, under ``policy``.

    The hidden state at position i predicts token i + 1, so the response tokens
    ``input_ids[:, L-T:]`` are predicted from positions ``L-T-1 .. L-2``. Only those positions
    are projected to the vocabulary. Logits are divided by ``temperature`` exactly as when
    sampling, so the logprobs stored at rollout and recomputed for training agree.

    The entropy carries a gradient only with ``entropy_grad=True`` (an entropy bonus in the
    loss); otherwise it is a statistic, and a policy with a linear head gets logprobs and
    entropy from one fused function that keeps no logits (``ppolm.engines.fast_cpu.fused``).

    ``full_dist=True`` also returns the whole log-softmax (B, T, V) (the exact KL needs it).

    With ``bottom`` (``policy.trunk_bottom(input_ids, attention_mask, depth)``, computed
    earlier) only the rest of the trunk runs.

    Shapes: input_ids, attention_mask (B, L), bottom (B, L, H); returns (B, T) logprobs and
    entropy.
    """
    L, T = input_ids.shape[1], response_len
    if bottom is not None:
        hidden = policy.trunk_top(bottom, input_ids, attention_mask, depth)    # (B, L, H)
    else:
        hidden, _ = policy.trunk(input_ids, attention_mask)        # (B, L, H)
    hidden = hidden[:, L - T - 1: L - 1]                          # (B, T, H)
    B, H = hidden.shape[0], hidden.shape[2]
    flat = hidden.reshape(B * T, H)                                # (B*T, H), contiguous
    tokens = input_ids[:, L - T:].reshape(B * T)                   # (B*T,)
    params = policy.head_params()
    if full_dist:
        dist = torch.log_softmax(policy.head(flat).float() / temperature, dim=-1)   # (B*T, V)
        logprobs = dist.gather(-1, tokens[:, None]).squeeze(-1)
        return ResponseForward(logprobs=logprobs.view(B, T),
                               entropy=token_entropy(dist).view(B, T), hidden=hidden,
                               dist=dist.view(B, T, -1))
    if params is not None and not entropy_grad:
        logprobs, entropy = head_logprobs(flat, params[0], params[1], tokens, temperature)
    else:
        logits = policy.head(flat).float() / temperature           # (B*T, V)
        logprobs = token_logprobs(logits, tokens)
        entropy = token_entropy(torch.log_softmax(logits, dim=-1))
    return ResponseForward(logprobs=logprobs.view(B, T), entropy=entropy.view(B, T),
                           hidden=hidden)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token], by gather minus logsumexp (no full log-softmax copy).

    Shapes: logits (B, T, V), tokens (B, T) -> (B, T).
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class TorchPolicy(Policy):
    """A policy defined in plain torch: saved as its constructor arguments plus a state dict."""

    arch: dict[str, Any]   # the constructor's keyword arguments

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save({"class": type(self).__name__, "arch": self.arch,
                    "state_dict": self.state_dict()}, Path(path) / "policy.pt")

    def load(self, path: str | Path) -> None:
        blob = _read_policy_file(Path(path) / "policy.pt")
        if blob.get("arch") != self.arch:
            raise CheckpointError(f"Saved policy at {str(path)!r} has architecture "
                                  f"{blob.get('arch')}; this policy has {self.arch}.")
        self.load_state_dict(blob["state_dict"])

    @classmethod
    def from_saved(cls, path: str | Path) -> TorchPolicy:
        """Rebuild a policy written by ``save``."""
        blob = _read_policy_file(Path(path) / "policy.pt")
        if blob.get("class") != cls.__name__:
            raise CheckpointError(f"{str(path)!r} holds a {blob.get('class')}, "
                                  f"not a {cls.__name__}.")
        policy = cls(**blob["arch"])
        policy.load_state_dict(blob["state_dict"])
        return policy


def _read_policy_file(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"No saved policy at {str(file)!r}.")
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise CheckpointError(f"Saved policy {str(file)!r} is corrupt or unreadable: {e}") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise CheckpointError(f"{str(file)!r} is not a ppolm policy file.")
    return blob

"""The one interface every policy implements, and the forward pass PPO needs from it.

A policy maps token ids to hidden states (its *trunk*) and hidden states to next-token logits (its
*head*). Splitting the two lets a value head share the trunk (one forward for policy and value)
and lets PPO project only the response positions to the vocabulary.

Padding convention: prompts are left-padded, responses right-padded after EOS, so the real tokens
of a row are contiguous. Position ids are derived from the attention mask
(``cumsum(mask) - 1``), which makes a sequence's logits independent of its padding.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ppolm.errors import CheckpointError, ConfigError


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that follow the padding. Shapes: (B, L) -> (B, L), long, 0 on left pads."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_slice(hidden: Tensor, response_len: int) -> Tensor:
    """The states predicting the last ``response_len`` tokens: position i predicts token i + 1.
    Shapes: (B, L, H) -> (B, T, H)."""
    L = hidden.shape[1]
    return hidden[:, L - response_len - 1: L - 1]


class PolicyOutput(NamedTuple):
    """What ``Policy.forward`` returns."""

    hidden: Tensor            # (B, L or T, H)
    logits: Tensor | None     # (B, L or T, V), None with logits=False


class Policy(nn.Module, ABC):
    """A causal language model: ``trunk`` (ids -> hidden states) then ``head`` (-> logits).

    Subclasses set ``vocab_size``, ``hidden_size`` and ``max_length`` (None if unbounded),
    and write ``trunk``, ``head``, ``save`` and ``load``; ``layers``,
    ``enable_gradient_checkpointing``, ``reference_model`` and ``select_cache`` have
    defaults. That is the whole contract, the same for every engine: the trainable parameters
    are the module's parameters that require grad, and device moves are ``nn.Module``'s.
    """

    vocab_size: int
    hidden_size: int
    max_length: int | None

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

    def select_cache(self, cache: Any, rows: Tensor) -> Any:
        """The cache ``trunk`` returned, cut to the batch rows ``rows`` (the sequences that go
        on: a multi-turn episode's next turn continues from it), or None when this policy
        cannot cut its cache (the next turn then runs the whole conversation again). The given
        cache may be changed in place. Shapes: rows (B',) long."""
        return None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int | None = None,
                logits: bool = True) -> PolicyOutput:
        """Hidden states and logits over whole sequences (no cache); with ``response_len`` = T,
        only at the positions predicting the last T tokens (position i predicts token i + 1).
        ``logits=False`` skips the head (a critic's trunk).

        Shapes: (B, L), (B, L) -> hidden (B, L, H) and logits (B, L, V); with T: (B, T, H) and
        (B, T, V)."""
        hidden, _ = self.trunk(input_ids, attention_mask)             # (B, L, H)
        if response_len is not None:
            # A copy, not a view of the trunk's states: FSDP2 hooks the outputs of the module
            # it wraps, and an in-place op on a view would bypass that hook (torch warns on
            # every such pass). (B, T, H) is small beside the (B, T, V) logits made from it.
            hidden = response_slice(hidden, response_len).clone()      # (B, T, H)
        return PolicyOutput(hidden, self.head(hidden) if logits else None)

    def layers(self) -> list[nn.Module]:
        """The repeated blocks of the trunk (decoder layers), in order; a sharding wrapper
        (FSDP2) gives each its own group. Empty when the policy has none."""
        return []

    def enable_gradient_checkpointing(self) -> list[nn.Module]:
        """Recompute the trunk's layers in backward instead of keeping their activations;
        returns the layers that do it when in training mode."""
        raise ConfigError(f"{type(self).__name__} does not support gradient_checkpointing "
                          "(a transformers model, HFPolicy, does).")

    def reference_model(self) -> Policy:
        """The frozen reference for the KL penalty: by default a copy of this policy as it is
        now, with no parameter trainable. A policy that can run its initial self without a
        copy overrides this (LoRA: the same model with its adapters disabled)."""
        reference = copy.deepcopy(self)
        reference.requires_grad_(False)
        return reference

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the weights (and whatever is needed to rebuild the policy) under ``path``."""

    @abstractmethod
    def load(self, path: str | Path) -> None:
        """Load weights written by ``save`` into this policy."""


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

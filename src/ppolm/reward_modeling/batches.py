"""Pairs as tensors, and the held-out evaluation: both sides of a batch of pairs go through
the model in one forward pass, either packed (``ppolm.reward_modeling.packing``: each pair's
shared prefix once, no padding) or as plain rows (chosen rows first, then rejected, padded on
the right)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ppolm.maths.preference import bradley_terry_loss, mean_margin, pair_accuracy
from ppolm.policies.reward_model import RewardModel, pad_right
from ppolm.reward_modeling.data import PreferencePairs
from ppolm.reward_modeling.packing import PackedPairs, pack_pairs


@dataclass(frozen=True)
class PairBatch:
    """B pairs: ``input_ids``, ``attention_mask`` (2B, L), rows 0..B-1 the chosen texts and
    B..2B-1 the rejected ones; ``margin`` (B,) or None."""

    input_ids: Tensor
    attention_mask: Tensor
    margin: Tensor | None

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def pair_batch(pairs: PreferencePairs, index: list[int], pad_id: int,
               device: torch.device | str = "cpu", packed: bool = False,
               dtype: torch.dtype = torch.float32) -> PairBatch | PackedPairs:
    """The pairs at ``index`` as one batch: packed (``dtype`` the model's) or plain rows."""
    margin = None if pairs.margin is None else [pairs.margin[i] for i in index]
    if packed:
        return pack_pairs([pairs.chosen[i] for i in index], [pairs.rejected[i] for i in index],
                          pad_id, margin, dtype=dtype, device=device)
    ids, mask = pad_right([pairs.chosen[i] for i in index] + [pairs.rejected[i] for i in index],
                          pad_id, device)
    return PairBatch(ids, mask, None if margin is None else
                     torch.tensor(margin, dtype=torch.float32, device=device))


def score_pairs(model: Any, batch: PairBatch | PackedPairs,
                autocast: contextlib.AbstractContextManager[Any] | None = None
                ) -> tuple[Tensor, Tensor]:
    """The chosen and rejected scores of a batch. Shapes: -> (B,), (B,) float32."""
    with autocast or contextlib.nullcontext():
        if isinstance(batch, PackedPairs):
            scores: Tensor = model(batch.input_ids, batch.attention_mask, batch.position_ids,
                                   batch.read_at)                                 # (2B,)
        else:
            scores = model(batch.input_ids, batch.attention_mask)                 # (2B,)
    return scores[:batch.pairs].float(), scores[batch.pairs:].float()


@torch.no_grad()
def evaluate_pairs(model: RewardModel, pairs: PreferencePairs, batch_size: int, pad_id: int,
                   device: torch.device | str = "cpu",
                   autocast: Any = None, center_rewards_coefficient: float | None = None,
                   packed: bool = False) -> dict[str, float]:
    """Held-out figures over every pair: ``eval/accuracy`` (chosen scored higher),
    ``eval/margin`` (mean r_c - r_r), ``eval/loss`` (the training loss)."""
    chosen, rejected, margins = [], [], []
    for start in range(0, len(pairs), batch_size):
        index = list(range(start, min(start + batch_size, len(pairs))))
        batch = pair_batch(pairs, index, pad_id, device, packed, model.dtype)
        c, r = score_pairs(model, batch, autocast() if autocast else None)
        chosen.append(c)
        rejected.append(r)
        if batch.margin is not None:
            margins.append(batch.margin)
    c, r = torch.cat(chosen), torch.cat(rejected)
    loss = bradley_terry_loss(c, r, torch.cat(margins) if margins else None,
                              center_rewards_coefficient)
    return {"eval/accuracy": float(pair_accuracy(c, r)), "eval/margin": float(mean_margin(c, r)),
            "eval/loss": float(loss.loss)}

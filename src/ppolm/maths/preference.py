"""Learning a reward from preferences: the Bradley-Terry loss and its diagnostics.

A pair is (chosen, rejected): a labeller preferred ``chosen``. Under the Bradley-Terry model
P(chosen > rejected) = sigmoid(r_c - r_r), so the negative log-likelihood of a pair is
``-log sigmoid(r_c - r_r)`` (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022). Two
options follow TRL's ``RewardTrainer``:

* a per-pair ``margin`` m (how strongly the labeller preferred; Llama 2, Touvron et al. 2023):
  ``-log sigmoid(r_c - r_r - m)``;
* ``center_rewards_coefficient`` c: ``c * mean((r_c + r_r)^2)``, which keeps the scores near 0
  (Eisenstein et al. 2023); the loss alone only fixes their differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PreferenceLoss:
    """The loss of a batch of pairs and its named terms (each a scalar tensor):
    ``loss = bradley_terry + centering``."""

    loss: Tensor
    bradley_terry: Tensor
    centering: Tensor


def _check(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected scores must both be (B,), got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}.")
    if margin is not None and margin.shape != chosen.shape:
        raise ValueError(f"margin must be (B,) like the scores {tuple(chosen.shape)}, got "
                         f"{tuple(margin.shape)}.")


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> PreferenceLoss:
    """The mean Bradley-Terry negative log-likelihood of the pairs, plus the centring term.

    ``-log sigmoid(x)`` is computed as ``softplus(-x)``, which stays finite for large |x|.

    Shapes: chosen, rejected, margin (B,) -> PreferenceLoss of scalars.
    """
    _check(chosen, rejected, margin)
    diff = chosen - rejected                                              # (B,)
    if margin is not None:
        diff = diff - margin
    bradley_terry = F.softplus(-diff).mean()
    if center_rewards_coefficient:
        centering = center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    else:
        centering = torch.zeros((), dtype=bradley_terry.dtype, device=bradley_terry.device)
    return PreferenceLoss(bradley_terry + centering, bradley_terry, centering)


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """The share of pairs whose chosen text scores strictly higher (a tie counts as wrong, as
    in TRL). Shapes: (B,), (B,) -> scalar."""
    _check(chosen, rejected)
    return (chosen > rejected).float().mean()


def mean_margin(chosen: Tensor, rejected: Tensor) -> Tensor:
    """The mean score difference r_c - r_r of the pairs. Shapes: (B,), (B,) -> scalar."""
    _check(chosen, rejected)
    return (chosen - rejected).float().mean()


def score_statistics(scores: Tensor) -> tuple[float, float]:
    """The mean and the (population) standard deviation of ``scores``, the reward model's
    normalisation: a score s is used as ``(s - mean) / std``. A constant set of scores gives
    std 1 (nothing to divide by). Shapes: (N,) -> two floats."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty (N,) tensor, got {tuple(scores.shape)}.")
    x = scores.double()
    std = float(x.std(unbiased=False))
    return float(x.mean()), std if std > 0 else 1.0

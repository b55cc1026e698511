"""Loss aggregation modes against hand-computed values, and the gradient-accumulation contract:
micro-batch losses with the whole minibatch's normalisers add up to the minibatch's loss."""

from __future__ import annotations

import pytest
import torch

from ppolm.errors import DataError
from ppolm.maths.aggregation import LOSS_AGGREGATIONS, aggregate_loss

# 3 ragged rows (lengths 3, 2, 1); 100 on padding must never count
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0], [6.0, 100.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_every_name_the_config_takes_is_one_the_maths_computes():
    """PPOConfig's loss_aggregation choices and aggregate_loss's modes are the same set, and a
    name outside it is refused by both."""
    from typing import get_args

    from ppolm import PPOConfig
    from ppolm.config.sections import LossAggregation
    from ppolm.errors import ConfigError

    assert set(get_args(LossAggregation)) == set(LOSS_AGGREGATIONS)
    x, mask = torch.ones(2, 3), torch.ones(2, 3)
    for name in LOSS_AGGREGATIONS:
        assert torch.isfinite(aggregate_loss(x, mask, name, max_len=3))
    with pytest.raises(DataError):
        aggregate_loss(x, mask, "sum")
    with pytest.raises(ConfigError):
        PPOConfig(loss_aggregation="sum")


@pytest.mark.parametrize("mode,kwargs,expected", [
    ("token-mean", {}, 21 / 6),                                   # (1+2+3+4+5+6) / 6 tokens
    ("token-mean", {"num_tokens": 10}, 21 / 10),
    ("seq-mean-token-mean", {}, (6 / 3 + 9 / 2 + 6 / 1) / 3),     # (2 + 4.5 + 6) / 3
    ("seq-mean-token-mean", {"num_seqs": 5}, (2 + 4.5 + 6) / 5),
    ("seq-mean-token-sum", {}, (6 + 9 + 6) / 3),                  # 7
    ("seq-mean-token-sum", {"num_seqs": 6.0}, 21 / 6),
    ("seq-mean-token-sum-norm", {"max_len": 4}, 21 / (3 * 4)),
    ("seq-mean-token-sum-norm", {"max_len": 4, "num_seqs": 2}, 21 / (2 * 4)),
])
def test_modes_by_hand(mode, kwargs, expected):
    loss = aggregate_loss(PER_TOKEN, MASK, mode, **kwargs)
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(expected)


def test_modes_disagree_on_ragged_rows():
    values = {aggregate_loss(PER_TOKEN, MASK, m, max_len=4).item() for m in LOSS_AGGREGATIONS}
    assert len(values) == 4


def test_tensor_normalisers_and_bool_mask():
    loss = aggregate_loss(PER_TOKEN, MASK.bool(), "token-mean", num_tokens=torch.tensor(7.0))
    assert float(loss) == pytest.approx(3.0)


def test_empty_row_counts_zero_in_seq_mean_token_mean():
    mask = MASK.clone()
    mask[2] = 0
    assert float(aggregate_loss(PER_TOKEN, mask, "seq-mean-token-mean")) \
        == pytest.approx((2 + 4.5 + 0) / 3)
    assert float(aggregate_loss(PER_TOKEN, torch.zeros(3, 3), "token-mean")) == 0.0


def batch():
    lengths = [5, 2, 4, 1]                                # micro-batches of 7 and 5 tokens
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(5)] for n in lengths])
    x = torch.randn(4, 5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    return x, w, mask


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_gradient_accumulation_with_global_normalisers(mode):
    x, w, mask = batch()
    whole = aggregate_loss((x * w) ** 2, mask, mode, max_len=8)     # default normalisers
    (g_whole,) = torch.autograd.grad(whole, w)
    n_tok, n_seq = mask.sum(), 4
    total, g_total = torch.zeros((), dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for rows in (slice(0, 2), slice(2, 4)):
        part = aggregate_loss((x[rows] * w) ** 2, mask[rows], mode, num_tokens=n_tok,
                              num_seqs=n_seq, max_len=8)
        (g,) = torch.autograd.grad(part, w)
        total, g_total = total + part.detach(), g_total + g
    assert torch.allclose(total, whole.detach())
    assert torch.allclose(g_total, g_whole)
    # the same from one backward over the summed micro-batch losses
    summed = sum(aggregate_loss((x[r] * w) ** 2, mask[r], mode, num_tokens=n_tok,
                                num_seqs=n_seq, max_len=8) for r in (slice(0, 2), slice(2, 4)))
    assert torch.allclose(torch.autograd.grad(summed, w)[0], g_whole)


@pytest.mark.parametrize("mode,split", [("token-mean", 2),             # 7 and 5 tokens
                                        ("seq-mean-token-mean", 1),    # 1 and 3 rows
                                        ("seq-mean-token-sum", 3)])
def test_per_micro_batch_normalisation_is_not_the_same(mode, split):
    """The trap PPO-NOTES warns about: with uneven micro-batches, averaging the micro-batch
    losses (each normalised by its own count) is not the minibatch's loss."""
    x, w, mask = batch()
    whole = aggregate_loss((x * w) ** 2, mask, mode)
    naive = sum(aggregate_loss((x[r] * w) ** 2, mask[r], mode)
                for r in (slice(0, split), slice(split, 4))) / 2
    assert not torch.allclose(naive, whole)


def test_unknown_mode_names_the_known_ones():
    with pytest.raises(DataError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum, "
                                        "seq-mean-token-sum-norm"):
        aggregate_loss(PER_TOKEN, MASK, "seq-mean")


def test_sum_norm_needs_max_len():
    with pytest.raises(DataError, match="needs max_len"):
        aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm")
    for bad in (0, -2, 2.5, True):
        with pytest.raises(DataError, match="max_len must be"):
            aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm", max_len=bad)


def test_bad_shapes_and_normalisers():
    with pytest.raises(DataError, match="one \\(B, T\\) shape"):
        aggregate_loss(PER_TOKEN, MASK[:2], "token-mean")
    with pytest.raises(DataError, match="one \\(B, T\\) shape"):
        aggregate_loss(PER_TOKEN[0], MASK[0], "token-mean")
    with pytest.raises(DataError, match="num_tokens must be > 0"):
        aggregate_loss(PER_TOKEN, MASK, "token-mean", num_tokens=0)
    with pytest.raises(DataError, match="num_seqs must be > 0"):
        aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum", num_seqs=-1)

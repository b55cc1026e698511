"""Loss aggregation: how a (B, T) per-token loss becomes the scalar that is differentiated.

The modes are named as in veRL (``loss_agg_mode``). They weight tokens differently:

    token-mean               sum_{i,t} l_{i,t} / N_tokens            every token weighs the same
                                                                    (DAPO, Yu et al. 2025)
    seq-mean-token-mean      1/N_seqs sum_i (1/|o_i|) sum_t l_{i,t}  every sequence weighs the
                                                                    same; a long one's tokens
                                                                    less (the GRPO objective of
                                                                    DeepSeekMath)
    seq-mean-token-sum       1/N_seqs sum_i sum_t l_{i,t}            a sequence weighs by length
    seq-mean-token-sum-norm  sum_{i,t} l_{i,t} / (N_seqs * max_len)  like token-sum, divided by
                                                                    a constant generation
                                                                    budget (Dr. GRPO, Liu et
                                                                    al. 2025)

Gradient accumulation: every mode is a sum over the batch's rows divided by a normaliser that
does not depend on how the rows are split. A caller that splits a minibatch into micro-batches
passes the WHOLE minibatch's normalisers (``num_tokens`` = its valid token count, ``num_seqs``
= its number of rows, all-reduced across ranks too) to each micro-batch; the micro-batch losses
then add up to the minibatch's loss, and so do their gradients. The defaults (this call's own
token / row count) are right only for a single, unsplit batch: normalising per micro-batch is
the 2024 "gradient accumulation bug" (PPO-NOTES, "Several processes").
"""

from __future__ import annotations

from torch import Tensor

from ppolm.errors import DataError

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                     "seq-mean-token-sum-norm")


def _positive(name: str, value: float | Tensor | None) -> None:
    """Python numbers are checked here; tensors are left alone (no device sync)."""
    if value is not None and not isinstance(value, Tensor) and not value > 0:
        raise DataError(f"{name} must be > 0 (the normaliser of the whole minibatch); got "
                        f"{value!r}.")


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: str, *,
                   num_tokens: float | Tensor | None = None,
                   num_seqs: float | Tensor | None = None,
                   max_len: int | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar by ``mode`` (one of ``LOSS_AGGREGATIONS``).

    * "token-mean": sum(l * mask) / num_tokens (default: mask.sum(), at least 1).
    * "seq-mean-token-mean": sum_i mean_t(l_i over its valid tokens) / num_seqs (default B);
      a row with no valid token counts 0 (and still counts in the default num_seqs).
    * "seq-mean-token-sum": sum_i sum_t(l_i * mask_i) / num_seqs (default B).
    * "seq-mean-token-sum-norm": sum(l * mask) / (num_seqs * max_len), ``max_len`` the constant
      generation budget (max new tokens), required.

    ``num_tokens`` is used by "token-mean" only, ``max_len`` by "seq-mean-token-sum-norm" only.
    Shapes: per_token, mask (B, T) -> a scalar ().
    """
    if mode not in LOSS_AGGREGATIONS:
        raise DataError(f"unknown loss aggregation {mode!r}; use one of "
                        f"{', '.join(LOSS_AGGREGATIONS)}.")
    if per_token.dim() != 2 or per_token.shape != mask.shape:
        raise DataError(f"per_token and mask must share one (B, T) shape; got "
                        f"{tuple(per_token.shape)} and {tuple(mask.shape)}.")
    _positive("num_tokens", num_tokens)
    _positive("num_seqs", num_seqs)
    m = mask.to(per_token.dtype)
    masked = per_token * m                                            # (B, T)
    seqs = per_token.shape[0] if num_seqs is None else num_seqs
    if mode == "token-mean":
        tokens = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked.sum() / tokens
    if mode == "seq-mean-token-mean":
        seq_means = masked.sum(1) / m.sum(1).clamp(min=1)             # (B,)
        return seq_means.sum() / seqs
    if mode == "seq-mean-token-sum":
        return masked.sum(1).sum() / seqs
    if max_len is None:
        raise DataError("loss aggregation 'seq-mean-token-sum-norm' needs max_len, the constant "
                        "generation budget (max new tokens) it divides by; got None.")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise DataError(f"max_len must be a positive int (the generation budget); got "
                        f"{max_len!r}.")
    return masked.sum() / (seqs * max_len)

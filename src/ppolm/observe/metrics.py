"""Per-iteration metrics: one JSON line each, appended and flushed at once; the names every
tracker and metrics.jsonl share; the sampled responses an iteration records."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ppolm.maths.advantages import explained_variance, masked_mean
from ppolm.maths.estimators import zero_signal_share
from ppolm.parallel.world import World
from ppolm.rollout.types import Advantages, Rollout, TurnInfo

#: The metric names an iteration logs, to metrics.jsonl and to every tracker alike
#: (``explained_variance`` with a value function only, ``zero_signal_groups`` with
#: samples_per_prompt > 1, turns_mean, truncated_fraction and tool_errors_mean with an
#: interaction, logprob_mismatch_* with the sampler's logprobs or tis_cap, the sampling_* and
#: groups_dropped with dynamic_sampling). Families named by a prefix come on top: see
#: METRIC_PREFIXES.
METRIC_NAMES = (
    "iteration", "reward_mean", "reward_std", "score_mean", "score_std", "kl", "kl_coef",
    "entropy", "approx_kl", "clipfrac", "ratio_dev_first", "ratio_max_dev", "loss",
    "policy_loss", "value_loss", "value_clipfrac", "explained_variance", "grad_norm", "lr",
    "skipped_updates", "epochs_done", "response_length", "eos_fraction", "zero_signal_groups",
    "tokens_per_s", "episodes_per_s", "turns_mean", "truncated_fraction", "tool_errors_mean",
    "logprob_mismatch_mean", "logprob_mismatch_max", "sampling_rounds", "groups_dropped",
    "sampled_per_trained", "sampled_score_mean",
    "time_generate", "time_reward", "time_forward", "time_advantages", "time_train", "time_total",
)
#: Families of metric names: the parts of a combined reward (``reward/<part>``) and the
#: evaluation on held-out prompts (``eval/<figure>``, see ``ppolm.EvalCallback``).
METRIC_PREFIXES = ("reward/", "eval/")
#: The columns of a sample table (samples.jsonl and the trackers' tables). A multi-turn
#: episode's row has ``turns`` too in samples.jsonl: its messages after the prompt in order,
#: ``{"role": ..., "text": ...}`` ("assistant" for the model's turns), and ``truncated``.
SAMPLE_COLUMNS = ("prompt", "response", "reward", "kl")
#: At most this many samples of an iteration are recorded (the first of its batch).
SAMPLES_PER_ITERATION = 16


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row that trackers record, by name: every finite int or float
    but the ``iteration`` (the trackers' step). The same numbers metrics.jsonl holds."""
    return {k: float(v) for k, v in row.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def batch_metrics(rollout: Rollout, advantages: Advantages, kl_seq: Tensor,
                  samples_per_prompt: int, critic: bool) -> dict[str, float]:
    """The whole batch's figures: reward and score (mean, std), KL per response (``kl_seq``,
    (B,)), response length; with a critic the value function's explained variance; with groups
    the share of groups with no signal; with the sampler's logprobs beside the trainer's (TIS)
    their ``logprob_mismatch``."""
    mask = rollout.response_mask
    row = {"reward_mean": float(advantages.rewards.sum(1).mean()),
           "reward_std": float(advantages.rewards.sum(1).std()),
           "score_mean": float(rollout.scores.mean()), "score_std": float(rollout.scores.std()),
           "kl": float(kl_seq.mean()), "response_length": float(mask.sum(1).mean())}
    if rollout.sampler_logprobs is not None:
        row.update(logprob_mismatch(rollout.logprobs, rollout.sampler_logprobs, mask))
    if critic:
        row["explained_variance"] = explained_variance(rollout.values, advantages.returns, mask)
    if samples_per_prompt > 1:
        row["zero_signal_groups"] = zero_signal_share(rollout.scores, samples_per_prompt)
    return row


def logprob_mismatch(logprobs: Tensor, other: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max |logprobs - other| over the valid tokens: how far two computations of the
    same tokens' log-probabilities (the trainer's and the sampler's) disagree.
    Shapes: (B, T) x 3 -> two floats."""
    diff = (logprobs - other).abs() * mask
    return {"logprob_mismatch_mean": float(masked_mean(diff, mask)),
            "logprob_mismatch_max": float(diff.max()) if diff.numel() else 0.0}


def turn_metrics(info: TurnInfo, world: World, batch_size: int) -> dict[str, float]:
    """Multi-turn episodes of the whole batch: mean model turns, share truncated (by
    max_turns or max_episode_tokens), mean failed tool calls per episode."""
    def mean(x: Tensor) -> float:
        return float(world.sum(x.sum().float())) / batch_size
    return {"turns_mean": mean(info.num_turns), "truncated_fraction": mean(info.truncated),
            "tool_errors_mean": mean(info.tool_errors)}


def iteration_samples(prompts: list[str], responses: list[str], rewards: list[float],
                      kls: list[float], turn_info: TurnInfo | None = None
                      ) -> list[dict[str, Any]]:
    """An iteration's first SAMPLES_PER_ITERATION samples as rows of SAMPLE_COLUMNS
    (``reward``: the reward function's score; ``kl``: the response's KL to the reference);
    with ``turn_info`` (multi-turn episodes) each row's ``turns`` and ``truncated`` too."""
    n = min(SAMPLES_PER_ITERATION, len(prompts))
    rows = [dict(zip(SAMPLE_COLUMNS, (prompts[i], responses[i], float(rewards[i]),
                                      float(kls[i])), strict=True)) for i in range(n)]
    if turn_info is not None:
        for i, row in enumerate(rows):
            row["turns"] = conversation(turn_info, i)
            row["truncated"] = bool(turn_info.truncated[i])
    return rows


def conversation(info: TurnInfo, b: int) -> list[dict[str, str]]:
    """Episode ``b``'s messages after its prompt, as they stand in its tokens: each model turn
    ("assistant") and the reply after it (its role), but a last reply that did not fit (the
    episode truncated) left out."""
    turns, replies = info.turns[b], info.replies[b]
    roles = info.reply_roles[b] if info.reply_roles else ["user"] * len(replies)
    out: list[dict[str, str]] = []
    for k, text in enumerate(turns):
        out.append({"role": "assistant", "text": text})
        if k < len(turns) - 1 and k < len(replies):
            out.append({"role": roles[k], "text": replies[k]})
    return out


class MetricsWriter:
    """Appends one JSON object per line to ``path``; flushed so a crash loses at most the
    line being written. With ``path`` None nothing is written."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file back (a torn last line is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines of iterations after ``iteration`` (written by a run that crashed
    before its next checkpoint), so a resumed run's metrics.jsonl has each iteration once."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:       # a torn last line
            continue
        if row.get("iteration", 0) <= iteration:
            rows.append(row)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)

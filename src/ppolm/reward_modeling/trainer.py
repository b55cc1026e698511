"""RewardModelTrainer: a Bradley-Terry reward model from preference pairs.

The loop reads like the PPO Trainer's: ``train()`` runs ``train_step()`` (one AdamW step over
``batch_size`` pairs), ``evaluate()`` every ``eval_every`` steps, the callbacks, and ``save()``
when due. Under torchrun the model is wrapped in DDP or sharded by FSDP2 (``distributed``,
``ppolm.reward_modeling.ranks``) and each rank takes an equal share of each batch (the
gradient average over the ranks is then the whole batch's mean).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from ppolm.config.reward_model import RewardModelConfig
from ppolm.engines.base import OptimizerSettings
from ppolm.engines.factory import resolve_device
from ppolm.engines.fast_cpu.attention import cpu_bf16_autocast, cpu_bf16_supported
from ppolm.engines.plain import make_adamw
from ppolm.errors import ConfigError, DataError
from ppolm.maths.preference import bradley_terry_loss, score_statistics
from ppolm.observe.callbacks import Callback, CallbackList
from ppolm.observe.metrics import MetricsWriter
from ppolm.parallel.world import World, init_process_group, launched
from ppolm.policies.reward_model import Normalization, RewardModel, pad_token_id, score_rows
from ppolm.reward_modeling import ranks
from ppolm.reward_modeling.batches import (
    evaluate_pairs,
    pair_batch,
    score_pairs,
)
from ppolm.reward_modeling.callbacks import default_callbacks
from ppolm.reward_modeling.data import PreferencePairs, tokenize_pairs
from ppolm.reward_modeling.packing import pair_groups
from ppolm.reward_modeling.state import RunState
from ppolm.training.schedule import lr_factor

log = logging.getLogger(__name__)


class RewardModelTrainer:
    """Train a reward model on preference pairs.

    Args:
        model: a ``RewardModel``, or what builds one (a causal LM, a sequence-classification
            model with num_labels=1, an ``HFPolicy``, or a local folder of either).
        tokenizer: the model's tokenizer (refused when its ids do not fit the embeddings).
        train_data: the pairs (``ppolm.reward_modeling.data``: a ``datasets.Dataset``, a list
            of dicts, or a .jsonl/.json/.parquet/.csv file).
        config: the settings (default ``RewardModelConfig()``).
        eval_data: held-out pairs (default: ``config.eval_fraction`` of ``train_data``, or
            none).
        columns: the data's names for prompt, chosen, rejected, margin.
        callbacks: ``ppolm.Callback`` instances; their hooks get this trainer (``iteration``
            is the step) and each step's metrics row.
        peft_config: LoRA adapters on the trunk (``peft.LoraConfig``; not with FSDP2).
    """

    def __init__(self, model: Any, tokenizer: Any, train_data: Any,
                 config: RewardModelConfig | None = None, *, eval_data: Any = None,
                 columns: dict[str, str] | None = None, callbacks: list[Callback] | None = None,
                 peft_config: Any = None) -> None:
        self.config = c = config if config is not None else RewardModelConfig()
        self.device = resolve_device(c.device)
        if c.cpu_bf16 and self.device.type == "cpu" and not cpu_bf16_supported():
            raise ConfigError("cpu_bf16=True, but PyTorch reports no bf16 support for this CPU "
                              "(it needs AVX-512 BF16 or AMX); leave cpu_bf16 off (float32).")
        if launched():                               # under torchrun: join the group
            init_process_group(self.device, timeout_s=600.0)
        self.world = World.current()
        if c.batch_size % self.world.size or c.micro % self.world.size:
            raise DataError(f"batch_size={c.batch_size} and micro_batch_size={c.micro} are "
                            f"split over {self.world.size} ranks: make both multiples of it.")
        torch.manual_seed(c.seed)                    # a new head's initial weights
        self.model = model if isinstance(model, RewardModel) else RewardModel(model, peft_config)
        if c.trainable_layers is not None:
            self.model.train_top_layers(c.trainable_layers)
        self.model.check_tokenizer(tokenizer)
        self.tokenizer, self.pad_id = tokenizer, pad_token_id(tokenizer)
        pairs = self.tokenize(train_data, columns)
        self.train_pairs, self.eval_pairs = pairs, None
        if eval_data is not None:
            self.eval_pairs = self.tokenize(eval_data, columns)
        elif c.eval_fraction:
            self.train_pairs, self.eval_pairs = split(pairs, c.eval_fraction, c.seed)
        self.groups = pair_groups(self.train_pairs.chosen, self.train_pairs.rejected) \
            if c.group_pairs else None
        if len(self.train_pairs) < c.batch_size:
            raise DataError(f"{len(self.train_pairs)} training pairs, fewer than batch_size="
                            f"{c.batch_size}: lower batch_size or give more pairs.")
        self.model.to(self.device).eval()            # dropout off: scores are deterministic
        self.sharded = self.world.distributed and c.distributed == "fsdp"
        self.forward_model: Any = self.model
        if self.world.distributed:
            self.forward_model = ranks.wrap(self.model, c.distributed, self.device, c.bf16)
        self.packed = c.packing and self.packing_works()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.params, OptimizerSettings(
            c.learning_rate, c.adam_eps, c.weight_decay, c.max_grad_norm))
        self.output_dir = Path(c.output_dir) if c.output_dir is not None else None
        path = self.output_dir / "metrics.jsonl" if self.output_dir is not None else None
        self.metrics = MetricsWriter(path if self.world.is_main else None)
        self.state = RunState(c, self.world, self.model, self.optimizer,
                              path if self.world.is_main else None, sharded=self.sharded)
        self.callbacks = CallbackList([*(callbacks or []), *default_callbacks(c)])
        self.history: list[dict[str, Any]] = []
        self.last_samples: list[dict[str, Any]] = []     # (what the shared trackers read)

    def tokenize(self, data: Any, columns: dict[str, str] | None) -> PreferencePairs:
        return tokenize_pairs(data, self.tokenizer, columns, self.config.max_length,
                              self.model.vocab_size)

    def packing_works(self) -> bool:
        """Whether packed pairs score as plain rows on this model (its attention takes a 4-D
        mask and position ids); checked on the first training pairs, a warning if not."""
        attention = getattr(self.model.base_trunk.config, "_attn_implementation", None)
        if attention not in ("sdpa", "eager"):   # others ignore a 4-D float mask, or fail hard
            log.warning("packing is off: the %s attention implementation does not take a 4-D "
                        "mask (sdpa and eager do); set packing=False to silence this.",
                        attention)
            return False
        index = list(range(min(4, len(self.train_pairs))))
        with torch.no_grad():
            plain = torch.cat(score_pairs(self.model, pair_batch(
                self.train_pairs, index, self.pad_id, self.device)))
            try:
                packed = torch.cat(score_pairs(self.model, pair_batch(
                    self.train_pairs, index, self.pad_id, self.device, True, self.model.dtype)))
                gap = float((packed - plain).abs().max())
            except (RuntimeError, ValueError, TypeError) as error:      # mask refused
                gap = math.inf
                log.debug("packed forward failed: %s", error)
        ranks.reshard(self.model, self.sharded)
        rtol = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        if gap <= rtol * (1.0 + float(plain.abs().max())):
            return True
        log.warning("packing is off: %s scores packed pairs %.3g away from plain rows (its "
                    "attention does not take a 4-D mask with position ids); set packing=False "
                    "to silence this.", type(self.model.base_trunk).__name__, gap)
        return False

    # --- the loop ----------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Optimizer steps completed (the name the callbacks and trackers read)."""
        return self.state.step

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_pairs) // self.config.batch_size

    @property
    def total_steps(self) -> int:
        c = self.config
        return c.steps if c.steps is not None else c.epochs * self.steps_per_epoch

    def train(self) -> list[dict[str, Any]]:
        """Run the steps left; returns this call's metric rows."""
        if self.state.step == 0:
            self.start_fresh()
        self.callbacks.call("on_train_begin", self)
        rows: list[dict[str, Any]] = []
        while self.state.step < self.total_steps:
            metrics = self.train_step()
            if self.state.step % self.config.eval_every == 0 or \
                    self.state.step == self.total_steps:
                metrics.update(self.evaluate())
            self.history.append(metrics)
            rows.append(metrics)
            stop = self.callbacks.on_iteration_end(cast(Any, self), metrics)
            end = stop or self.state.step == self.total_steps
            if self.output_dir is not None and (end or (
                    self.config.save_every and self.state.step % self.config.save_every == 0)):
                self.save()
            if stop:
                break
        self.callbacks.call("on_train_end", self, rows)
        return rows

    def batch_index(self, step: int) -> list[int]:
        """The pairs of optimizer step ``step`` (0-based): the epoch's shuffle (seeded by the
        seed and the epoch; with ``group_pairs`` whole groups, each shuffled inside) cut into
        batches; under torchrun this rank's share."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        if self.groups is None:
            order = torch.randperm(len(self.train_pairs), generator=g).tolist()
        else:                                   # whole groups, each shuffled inside
            order = [group[i] for group in (self.groups[j] for j in torch.randperm(
                len(self.groups), generator=g).tolist())
                for i in torch.randperm(len(group), generator=g).tolist()]
        b = self.config.batch_size
        return self.world.share(order[k * b: (k + 1) * b])

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.device.type == "cpu" and self.config.cpu_bf16:
            return cpu_bf16_autocast()
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, Any]:
        """One AdamW step over a batch of pairs (micro-batches accumulated); its metrics."""
        c, start = self.config, time.perf_counter()
        lr = c.learning_rate * lr_factor(c.lr_schedule, self.state.step, self.total_steps,
                                         c.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        index = self.batch_index(self.state.step)
        micro = c.micro // self.world.size
        self.optimizer.zero_grad(set_to_none=True)
        chosen, rejected, loss_sum = [], [], torch.zeros((), device=self.device)
        for first in range(0, len(index), micro):
            batch = pair_batch(self.train_pairs, index[first: first + micro], self.pad_id,
                               self.device, self.packed, self.model.dtype)
            r_c, r_r = score_pairs(self.forward_model, batch, self.autocast())
            loss = bradley_terry_loss(r_c, r_r, batch.margin, c.center_rewards_coefficient)
            # a micro-batch's mean weighted by its share of this rank's batch: the gradient is
            # that of the batch's mean (DDP then averages equal shares over the ranks)
            share = batch.pairs / len(index)
            (loss.loss * share).backward()
            loss_sum += loss.loss.detach() * share
            chosen.append(r_c.detach())
            rejected.append(r_r.detach())
        norm = ranks.clip_gradients(self.params, c.max_grad_norm)
        finite = math.isfinite(norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        r_c, r_r = torch.cat(chosen), torch.cat(rejected)
        return {"iteration": self.state.step, "epoch": (self.state.step - 1)
                // self.steps_per_epoch, **self._batch_figures(loss_sum, r_c, r_r),
                "grad_norm": norm, "skipped_updates": int(not finite), "lr": lr,
                "time_step": time.perf_counter() - start}

    def _batch_figures(self, loss: Tensor, r_c: Tensor, r_r: Tensor) -> dict[str, float]:
        """The whole batch's loss, accuracy, margin and score statistics (summed over the
        ranks under torchrun)."""
        scores = torch.cat([r_c, r_r]).float()
        n = self.world.size
        totals = torch.stack([loss * r_c.numel(), (r_c > r_r).float().sum(),
                              (r_c - r_r).float().sum(), scores.sum(), (scores ** 2).sum()])
        t = self.world.sum(totals.cpu()).tolist()
        pairs, texts = r_c.numel() * n, scores.numel() * n
        mean = t[3] / texts
        return {"loss": t[0] / pairs, "accuracy": t[1] / pairs, "margin": t[2] / pairs,
                "score_mean": mean, "score_std": math.sqrt(max(t[4] / texts - mean ** 2, 0.0))}

    def evaluate(self) -> dict[str, float]:
        """Held-out ``eval/accuracy``, ``eval/margin`` and ``eval/loss`` over every held-out
        pair (empty without held-out pairs; every rank scores all of them)."""
        if self.eval_pairs is None:
            return {}
        out = evaluate_pairs(self.model, self.eval_pairs, self.config.eval_batch_size,
                             self.pad_id, self.device, self.autocast,
                             self.config.center_rewards_coefficient, self.packed)
        ranks.reshard(self.model, self.sharded)
        return out

    # --- state and files ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The weights, AdamW's state and the step (``RunState.state_dict``)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default output_dir/checkpoints/iter-NNNNNNN); returns it."""
        final = self.state.save(path)
        self.callbacks.call("on_save", self, final)
        return final

    def resume(self, path: str | Path | None = None) -> int:
        """Continue from a checkpoint (default: the newest under output_dir) on the next
        ``train()``; returns the step reached."""
        return self.state.resume(path)

    def start_fresh(self) -> None:
        """Refuse an earlier run in output_dir (``overwrite`` deletes it)."""
        self.state.start_fresh()

    def normalization(self, texts: list[str] | None = None) -> Normalization:
        """Mean and std of the model's scores on ``texts`` (default: both sides of the first
        ``calibration_pairs`` held-out pairs, else training pairs)."""
        if texts is None:
            pairs = self.eval_pairs if self.eval_pairs is not None else self.train_pairs
            n = min(len(pairs), self.config.calibration_pairs)
            rows = pairs.chosen[:n] + pairs.rejected[:n]
        else:
            rows = [self.tokenizer(t)["input_ids"] for t in texts]
        if not rows:
            raise DataError("the calibration set is empty: give some texts.")
        scores = score_rows(self.model, rows, self.config.eval_batch_size, self.pad_id,
                            self.device)
        ranks.reshard(self.model, self.sharded)
        mean, std = score_statistics(scores)
        return Normalization(mean, std, len(rows))

    def save_model(self, path: str | Path, calibration: list[str] | None = None) -> Path:
        """The model as an ``AutoModelForSequenceClassification`` folder (num_labels=1,
        pad_token_id set; LoRA merged) with the tokenizer, and the normalisation measured on
        ``calibration`` (see ``normalization``) in ``reward_normalization.json``. Rank 0
        writes it (under FSDP2 the whole weights gathered from the ranks' shards)."""
        norm = self.normalization(calibration)
        state = ranks.full_state(self.model) if self.sharded else None
        self.world.on_main(lambda: None if self.model.save_pretrained(
            path, self.tokenizer, norm, state) else None, "writing the reward model")
        return Path(path)


def split(pairs: PreferencePairs, fraction: float, seed: int
          ) -> tuple[PreferencePairs, PreferencePairs]:
    """A held-out share of the pairs (at least one), chosen by ``seed``: (train, held out)."""
    n = len(pairs)
    held = max(1, round(n * fraction))
    if held >= n:
        raise DataError(f"eval_fraction holds out all {n} pairs; lower it or give more pairs.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return pairs.subset(sorted(order[held:])), pairs.subset(sorted(order[:held]))

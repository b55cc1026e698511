"""Trainer: the PPO loop. ``train()`` reads as the algorithm: collect, compute advantages,
update, log, save."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppolm.engines.fast_cpu import clipping
from ppolm.maths.advantages import compute_gae, explained_variance, masked_sum, masked_var, whiten
from ppolm.training.averaging import TailAverage
from ppolm.training.config import PPOConfig
from ppolm.rollout.env import TextGenerationEnv
from ppolm.errors import ConfigError, TrainingError
from ppolm.engines.fast_cpu.grad_buffers import GradBuffers
from ppolm.training.kl_control import KLController
from ppolm.maths.losses import full_kl, kl_penalty, policy_loss, value_loss
from ppolm.engines.fast_cpu.memory import keep_freed_memory
from ppolm.training.metrics import MetricsWriter
from ppolm.engines.fast_cpu.optim import AdamW
from ppolm.policies.base import (
    Policy,
    compiled_trunks,
    forward_response,
    frozen_split,
    samples_bottom,
)
from ppolm.policies.hf import float32_attention
from ppolm.policies.value import ValueHead
from ppolm.training.progress import Timer, progress_bar
from ppolm.rollout.types import Episodes, Rollout


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_bf16_supported() -> bool:
    """Whether PyTorch's CPU kernels support bf16 products on this CPU."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """PPO for a language-model policy.

    Args:
        policy: the policy to train (any ``Policy``).
        env: the TextGenerationEnv giving prompts and rewards.
        config: the PPOConfig.
        value_head: a ValueHead; default a head on the policy's shared trunk.
        reference: the frozen reference policy for the KL penalty; default a frozen copy of
            ``policy`` as it is now.
    """

    def __init__(self, policy: Policy, env: TextGenerationEnv, config: PPOConfig,
                 value_head: ValueHead | None = None, reference: Policy | None = None) -> None:
        self.config, self.env = config, env
        self.device = resolve_device(config.device)
        if config.cpu_bf16 and self.device.type == "cpu" and not cpu_bf16_supported():
            raise ConfigError("cpu_bf16=True, but PyTorch reports no bf16 support for this CPU "
                              "(it needs AVX-512 BF16 or AMX); leave cpu_bf16 off (float32).")
        env.check_policy(policy)
        # Dropout off everywhere: it makes logprobs noisy and the PPO ratio wrong.
        self.policy = policy.to(self.device).eval()
        self.value_head = (value_head or ValueHead(policy.hidden_size)).to(self.device).eval()
        self.reference = (reference or copy.deepcopy(policy)).to(self.device).eval()
        self.reference.requires_grad_(False)
        params = {id(p): p for m in (self.policy, self.value_head) for p in m.parameters()
                  if p.requires_grad}
        self.params = list(params.values())
        # With malloc keeping freed memory, fresh gradients cost no page faults, and the
        # linears' buffers (zeroed, then read back by addmm_) would cost more than they save;
        # the tables and the head keep theirs (docs/benchmarks.md).
        kept = self.device.type == "cpu" and config.keep_freed_memory and keep_freed_memory()
        head = self.policy.head_params()
        self.grad_buffers = GradBuffers(self.policy, self.value_head,
                                        heads=[head[0]] if head is not None else [],
                                        linears=not kept and not config.compile)
        # The fused kernel (CPU and CUDA) updates all parameters in one pass: on a 2-core CPU,
        # 8x faster than the default per-tensor loop for a 49k-token embedding. Token tables
        # that only lookups write have only the rows a gradient ever reached updated (the same
        # numbers, ppolm.engines.fast_cpu.optim).
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.optimizer = AdamW(self.params, lr=config.learning_rate, eps=config.adam_eps,
                               weight_decay=config.weight_decay, fused=fused,
                               row_tables=self.grad_buffers.row_tables,
                               rows=self.grad_buffers.rows)
        total = config.iterations * config.ppo_epochs * config.num_minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: _lr_factor(
            config.lr_schedule, step, total, config.warmup_steps))
        self.kl_ctl = KLController(config.kl_coef, config.adaptive_kl, config.kl_target,
                                   config.kl_horizon)
        self.depth, self.ref_shares_bottom = frozen_split(
            self.policy, self.reference, self.device, config.reuse_frozen_layers)
        if config.compile:
            check_compile(self.device, self.policy, self.reference, self.value_head.critic)
        self.sample_gen = torch.Generator(self.device).manual_seed(config.seed)
        self.shuffle_gen = torch.Generator().manual_seed(config.seed + 1)
        self.iteration = 0            # iterations completed
        self.bad_updates = 0          # non-finite updates in a row
        self.history: list[dict[str, Any]] = []
        self.average = TailAverage()  # of the last config.average_last iterates
        self.last_iterate: dict[str, Tensor] | None = None   # set when the average replaced it
        self.output_dir = Path(config.output_dir)
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl")

    # --- the loop --------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run the remaining iterations; returns one metrics dict per iteration run."""
        from ppolm.training.checkpoint import save_checkpoint, start_fresh

        cfg = self.config
        if self.iteration == 0:
            start_fresh(self)
        with progress_bar(cfg.progress, cfg.iterations, self.iteration) as bar:
            while self.iteration < cfg.iterations:
                timer = Timer()
                episodes, rollout = self.collect(timer)
                with timer("time_advantages"):
                    rollout = self.compute_advantages(rollout)
                with timer("time_train"):
                    stats = self.update(rollout)
                self.iteration += 1
                self.average_weights()
                row = self.log(episodes, rollout, stats, timer)
                bar.update(row)
                if cfg.save_every and self.iteration % cfg.save_every == 0:
                    save_checkpoint(self)
        if not cfg.save_every or self.iteration % cfg.save_every:
            save_checkpoint(self)
        return self.history

    # --- phases ------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, timer: Timer | None = None) -> tuple[Episodes, Rollout]:
        """Sample a batch, keeping the policy's logprobs and states from the sampling pass
        (or, with rollout_logprobs='forward', one more forward pass of the policy: logprobs and
        values sharing the trunk); then one forward of the reference over the whole sequences,
        at the sampling temperature (with kl_estimator='full', the reference's whole
        distribution over the response too)."""
        timer = timer or Timer()
        cfg = self.config
        d = self.depth
        from_sampler = cfg.rollout_logprobs == "sampler"
        # A policy that splits its trunk but cannot also return the split from its sampling
        # steps gets the frozen layers' output from one forward of them.
        sampler_bottom = from_sampler and samples_bottom(self.policy)
        with timer("time_generate"), self._autocast(), self._casts_cached(self.policy):
            episodes = self.env.sample(self.policy, cfg.batch_size, cfg.temperature,
                                       self.device, self.sample_gen, record=from_sampler,
                                       depth=d if sampler_bottom else 0)
        timer.add("time_reward", episodes.reward_seconds)
        timer.add("time_generate", -episodes.reward_seconds)
        ids, mask = episodes.input_ids, episodes.attention_mask
        T = episodes.response_mask.shape[1]
        exact_kl = cfg.kl_estimator == "full"      # (config: only with kl_mode='loss')
        with timer("time_forward"), self._autocast(), self._compiled():
            # The frozen lower layers' output, once per rollout (depth 0: none).
            bottom = (episodes.bottom if sampler_bottom else
                      self.policy.trunk_bottom(ids, mask, d) if d else None)      # (B, L, H)
            if from_sampler:
                assert episodes.logprobs is not None and episodes.hidden is not None
                logprobs, hidden = episodes.logprobs, episodes.hidden
            else:
                # The same path as the update's forward, so the first ratio is exactly 1.
                fwd = forward_response(self.policy, ids, mask, T, cfg.temperature,
                                       bottom=bottom, depth=d)
                logprobs, hidden = fwd.logprobs, fwd.hidden
            values = self.value_head(hidden, ids, mask, T).float()
            ref = forward_response(self.reference, ids, mask, T, cfg.temperature,
                                   full_dist=exact_kl,
                                   bottom=bottom if self.ref_shares_bottom else None, depth=d)
        rmask = episodes.response_mask.float()
        zeros = torch.zeros_like(rmask)
        rollout = Rollout(input_ids=ids, attention_mask=mask, response_mask=rmask,
                          logprobs=logprobs.float() * rmask,
                          ref_logprobs=ref.logprobs.float() * rmask,
                          values=values * rmask, scores=episodes.scores.float(),
                          rewards=zeros, advantages=zeros, returns=zeros,
                          ref_dist=ref.dist.float() if ref.dist is not None else None,
                          token_scores=episodes.token_scores, bottom=bottom)
        return episodes, rollout

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """Per-token rewards (the score at the last response token, or its increments token by
        token with prefix shaping; -beta * KL on every token when the KL is in the reward), then
        GAE and advantage whitening."""
        cfg, mask = self.config, rollout.response_mask
        scores, token_scores = rollout.scores, rollout.token_scores
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)   # (B,)
        if cfg.whiten_rewards:
            # s -> (s - mean) / std + mean; with increments: each / std, the shift at the end.
            ones = torch.ones_like(scores)
            whitened = whiten(scores, ones, shift_mean=False)
            if token_scores is not None:
                std = torch.sqrt(masked_var(scores, ones) + 1e-8)
                token_scores = token_scores / std
                token_scores = token_scores.scatter_add(
                    1, last[:, None], (whitened - token_scores.sum(1))[:, None]) * mask
            scores = whitened
        if cfg.kl_mode == "reward":
            kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator) * mask
            rewards = -self.kl_ctl.value * kl
        else:
            rewards = torch.zeros_like(mask)
        if token_scores is not None:
            rewards = rewards + token_scores
        else:
            rewards = rewards.scatter_add(1, last[:, None], scores[:, None])
        advantages, returns = compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        return Rollout(**{**rollout.__dict__, "rewards": rewards, "advantages": advantages,
                          "returns": returns})

    def update(self, rollout: Rollout) -> dict[str, float]:
        """K epochs over shuffled minibatches; one optimizer step per minibatch."""
        cfg = self.config
        stats: dict[str, list[float]] = defaultdict(list)
        epochs_done = 0
        # backward adds into kept gradients (grad_buffers); trunks compiled with config.compile
        with self.grad_buffers.active(), self._compiled():
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(cfg.batch_size, generator=self.shuffle_gen).to(self.device)
                epoch_kl = []
                for start in range(0, cfg.batch_size, cfg.minibatch_size):
                    mb = rollout.select(perm[start: start + cfg.minibatch_size])
                    step = self.optimizer_step(mb)
                    if epoch == 0 and start == 0:
                        stats["ratio_dev_first"].append(step["ratio_max_dev"])
                    for k, v in step.items():
                        stats[k].append(v)
                    epoch_kl.append(step["approx_kl"])
                epochs_done += 1
                if cfg.target_approx_kl is not None and np.mean(epoch_kl) > cfg.target_approx_kl:
                    break
        # No gradients are held between updates: the rollout gets their memory.
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_buffers.release()
        # The mean over the applied steps (a skipped step's statistics are NaN); NaN if none.
        out = {k: float(np.nanmean(v)) if not np.isnan(v).all() else math.nan
               for k, v in stats.items() if k != "skipped"}
        out["skipped_updates"] = float(np.sum(stats["skipped"]))
        out["epochs_done"] = float(epochs_done)
        return out

    def optimizer_step(self, minibatch: Rollout) -> dict[str, float]:
        """Gradients of one minibatch, global-norm clipping, then an optimizer step, or a
        skipped step when the loss or the gradient norm is not finite."""
        cfg = self.config
        totals = self.accumulate_gradients(minibatch)
        grad_norm = float(clipping.grad_norm(self.params, self.grad_buffers.rows))
        finite = math.isfinite(grad_norm) and math.isfinite(totals["loss"])
        if finite:
            # Clipping to max_grad_norm happens inside the step (ppolm.engines.fast_cpu.clipping).
            clipping.step_with_factor(self.optimizer, self.params,
                                      clipping.clip_factor(grad_norm, cfg.max_grad_norm))
            self.scheduler.step()
            self.bad_updates = 0
        else:
            # Skip the update rather than apply NaN/inf to the weights (as veRL does).
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_updates += 1
            if self.bad_updates >= cfg.max_bad_updates:
                raise TrainingError(
                    f"{self.bad_updates} non-finite updates in a row (loss {totals['loss']}, "
                    f"grad norm {grad_norm}) at iteration {self.iteration + 1}; check the "
                    "rewards and lower learning_rate. The last checkpoint is kept.")
        totals["grad_norm"] = grad_norm
        totals["skipped"] = 0.0 if finite else 1.0
        return totals

    def accumulate_gradients(self, minibatch: Rollout) -> dict[str, float]:
        """Zero the gradients, then backward each micro-batch. Losses are normalised by the
        token count of the whole minibatch, so the accumulated gradients equal those of one
        pass over it. Returns the minibatch's loss statistics."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_buffers.zero_grad()
        num_tokens = minibatch.response_mask.sum().clamp(min=1)
        totals: dict[str, float] = defaultdict(float)
        n = minibatch.input_ids.shape[0]
        size = cfg.minibatch_size // cfg.grad_accum_steps      # = micro_batch_size
        for start in range(0, n, size):
            micro = minibatch.select(torch.arange(start, min(start + size, n), device=self.device))
            with self._autocast():
                loss, parts = self.loss(micro, num_tokens)
            loss.backward()
            share = float(micro.response_mask.sum() / num_tokens)
            for k, v in parts.items():
                totals[k] = max(totals[k], v) if k == "ratio_max_dev" else totals[k] + share * v
        self.grad_buffers.densify()
        return dict(totals)

    def loss(self, micro: Rollout, num_tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The PPO loss of one micro-batch: clipped surrogate + vf_coef * clipped value loss
        - ent_coef * entropy (+ beta * KL when the KL is in the loss)."""
        cfg, mask = self.config, micro.response_mask
        T = mask.shape[1]
        exact_kl = cfg.kl_estimator == "full"      # (config: only with kl_mode='loss')
        fwd = forward_response(self.policy, micro.input_ids, micro.attention_mask, T,
                               cfg.temperature, entropy_grad=cfg.ent_coef > 0,
                               full_dist=exact_kl, bottom=micro.bottom, depth=self.depth)
        values = self.value_head(fwd.hidden, micro.input_ids, micro.attention_mask, T)
        pg, pg_stats = policy_loss(fwd.logprobs, micro.logprobs, micro.advantages, mask,
                                   cfg.clip_range, num_tokens)
        vf, vf_stats = value_loss(values, micro.values, micro.returns, mask,
                                  cfg.clip_range_value, num_tokens)
        ent = masked_sum(fwd.entropy, mask) / num_tokens
        loss = pg + cfg.vf_coef * vf - cfg.ent_coef * ent
        if cfg.kl_mode == "loss":
            if exact_kl:
                assert fwd.dist is not None and micro.ref_dist is not None
                kl = full_kl(fwd.dist, micro.ref_dist)                        # (b, T)
            else:
                kl = kl_penalty(fwd.logprobs, micro.ref_logprobs, cfg.kl_estimator)
            loss = loss + self.kl_ctl.value * (kl * mask).sum() / num_tokens
        # The shares of a mean over the minibatch: the caller adds them up.
        scale = float(num_tokens / mask.sum().clamp(min=1))
        stats = {"loss": float(loss.detach()) * scale, "policy_loss": float(pg.detach()) * scale,
                 "value_loss": float(vf.detach()) * scale, "entropy": float(ent.detach()) * scale,
                 **{k: float(v) for k, v in {**pg_stats, **vf_stats}.items()}}
        return loss, stats

    def average_weights(self) -> None:
        """Tail averaging (config.average_last = N): add the policy's weights to the running
        mean after each of the last N iterations; after the last one, the policy takes the mean
        and its last iterate is kept in ``last_iterate`` (trainable weights by name)."""
        cfg = self.config
        if cfg.average_last and self.iteration > cfg.iterations - cfg.average_last:
            self.average.add(self.policy)
            if self.iteration == cfg.iterations:
                self.last_iterate = self.average.swap_in(self.policy)

    def log(self, episodes: Episodes, rollout: Rollout, stats: dict[str, float],
            timer: Timer) -> dict[str, Any]:
        """Write the iteration's metrics (fixed names, see ppolm.training.metrics.METRIC_NAMES)."""
        cfg, mask = self.config, rollout.response_mask
        # The metric uses the optimised estimator; for the exact KL (optimised per state),
        # k1 on the sampled tokens: the unbiased estimate of the KL of whole responses.
        estimator = "k1" if cfg.kl_estimator == "full" else cfg.kl_estimator
        kl_seq = (kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator)
                  * mask).sum(1)                                            # (B,)
        beta = self.kl_ctl.value
        self.kl_ctl.update(float(kl_seq.mean()), cfg.batch_size)
        total = timer.total()
        n_tokens = float(mask.sum())
        row: dict[str, Any] = {
            "iteration": self.iteration,
            "reward_mean": float(rollout.rewards.sum(1).mean()),
            "reward_std": float(rollout.rewards.sum(1).std()),
            "score_mean": float(rollout.scores.mean()),
            "score_std": float(rollout.scores.std()),
            "kl": float(kl_seq.mean()), "kl_coef": beta,
            "explained_variance": explained_variance(rollout.values, rollout.returns, mask),
            "lr": self.scheduler.get_last_lr()[0],
            "response_length": float(mask.sum(1).mean()),
            "eos_fraction": float(episodes.ended.float().mean()),
            "tokens_per_s": n_tokens / total, "episodes_per_s": cfg.batch_size / total,
            **stats, **timer.seconds, "time_total": total,
            **{f"reward/{k}": v for k, v in episodes.reward_parts.items()},
        }
        self.history.append(row)
        self.metrics.write(row)
        return row

    # --- helpers -----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.device.type == "cpu" and self.config.cpu_bf16:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            stack.enter_context(float32_attention())
            return stack
        return contextlib.nullcontext()

    def _compiled(self) -> contextlib.AbstractContextManager[Any]:
        """With config.compile, the trunks' whole-sequence passes through torch.compile."""
        if self.config.compile:
            return compiled_trunks(self.policy, self.reference, self.value_head.critic)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _casts_cached(self, module: torch.nn.Module) -> Iterator[None]:
        """Under CPU autocast, the casts of ``module``'s frozen weights kept for the whole block
        too. Autocast keeps the bf16 copy of a weight for the rest of its block only when the
        weight requires grad; a frozen one (``freeze_lower_layers``) would be cast again at every
        sampling step, which made generation slower than in float32. The block runs without
        gradient, so marking them for its duration changes nothing else."""
        frozen = ([p for p in module.parameters() if not p.requires_grad and p.is_floating_point()]
                  if self.device.type == "cpu" and self.config.cpu_bf16
                  and not torch.is_grad_enabled() else [])
        for p in frozen:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(False)

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default: under output_dir/checkpoints); returns its folder."""
        from ppolm.training.checkpoint import save_checkpoint

        return save_checkpoint(self, path)

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: the newest complete one under output_dir/checkpoints)
        and continue from it on the next ``train()``; returns the iteration reached."""
        from ppolm.training.checkpoint import load_checkpoint

        load_checkpoint(self, path)
        return self.iteration


def check_compile(device: torch.device, *policies: Policy | None) -> None:
    """A ConfigError for a policy that cannot compile its trunk, or on a CPU without the C++
    compiler that torch.compile builds its kernels with."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (
            os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise ConfigError("compile=True on CPU needs a C++ compiler (torch.compile builds its "
                          "kernels with one): install g++, or leave compile off.")
    for policy in policies:
        if policy is not None and not policy.supports_compile:
            raise ConfigError(f"compile=True: {type(policy).__name__} does not support "
                              "torch.compile of its trunk (transformers policies and "
                              "TransformerPolicy do); leave compile off.")


def _lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of ``total``: a linear
    warm-up over the first ``warmup`` steps, then the schedule over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0

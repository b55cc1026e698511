"""Trainer: the PPO loop. ``train()`` reads as the algorithm: collect, compute advantages,
update, log, adapt the KL coefficient, save. How the numbers are computed is the engine's
business (``ppolm.engines``)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppolm.checkpoint import export
from ppolm.config.ppo import PPOConfig
from ppolm.engines.base import Engine, OptimizerSettings, Sequences
from ppolm.engines.factory import make_engine, resolve_device
from ppolm.errors import ConfigError, TrainingError
from ppolm.evaluation.callback import EvalCallback
from ppolm.maths.losses import sequence_kl
from ppolm.observe.callbacks import Callback, CallbackList
from ppolm.observe.default_callbacks import default_callbacks
from ppolm.observe.metrics import MetricsWriter, batch_metrics, iteration_samples, turn_metrics
from ppolm.observe.timer import Timer
from ppolm.parallel.world import World, init_process_group
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead
from ppolm.rollout.env import TextGenerationEnv
from ppolm.rollout.types import Advantages, Episodes, Rollout
from ppolm.training.averaging import TailAverage
from ppolm.training.batch_sampler import BatchSampler
from ppolm.training.kl_control import KLController
from ppolm.training.objective import FIRST_FORWARD_STATS, MAXED_STATS, estimate_advantages, ppo_loss
from ppolm.training.schedule import lr_factor
from ppolm.training.trainer_state import TrainerState


class Trainer:
    """PPO for a language-model policy.

    Args:
        policy: the policy to train (any ``Policy``).
        env: the TextGenerationEnv giving prompts and rewards.
        config: the PPOConfig.
        value_head: a ValueHead; default a head on the policy's shared trunk. None with a
            critic-free ``advantage_estimator`` (no value function is built or run).
        reference: the frozen reference policy for the KL penalty; default
            ``policy.reference_model()`` (a frozen copy of ``policy`` as it is now; with LoRA,
            the same model with its adapters disabled).
        engine: how the numbers are computed; default the one ``config.engine`` names.
        callbacks: ``ppolm.Callback`` instances called at fixed points of the loop, in order,
            before the ones the config asks for (health checks, trackers, metrics.jsonl).
        eval_dataset: held-out prompts (a list, a ``datasets.Dataset``, a prompts file), as
            TRL's: an ``EvalCallback(eval_dataset)`` is made for you, first of the callbacks
            (``eval/*`` metrics every 10 iterations and after the last). For its other
            settings, pass an ``EvalCallback`` in ``callbacks`` instead.
    """

    def __init__(self, policy: Policy, env: TextGenerationEnv, config: PPOConfig,
                 value_head: ValueHead | None = None, reference: Policy | None = None,
                 engine: Engine | None = None, callbacks: list[Callback] | None = None,
                 eval_dataset: Any = None) -> None:
        self.config, self.env = config, env
        self.device = resolve_device(config.device)
        init_process_group(self.device, config.dist_timeout)     # under torchrun only
        self.world = World.current()
        self.world.check_config(config)
        given = list(callbacks or [])      # (the defaults record the run on rank 0 only)
        if eval_dataset is not None:
            given.insert(0, EvalCallback(eval_dataset))
        self.callbacks = CallbackList(given + default_callbacks(config, given))
        self.engine = engine or make_engine(config, self.device)
        env.check_policy(policy)
        # Dropout off everywhere: it makes logprobs noisy and the PPO ratio wrong.
        self.policy = self.engine.place(policy).eval()
        if config.critic_free and value_head is not None:
            raise ConfigError(f"advantage_estimator={config.advantage_estimator!r} uses no "
                              "value function; pass no value_head (or use 'gae').")
        self.value_head = (None if config.critic_free else
                           self.engine.place(value_head or ValueHead(policy.hidden_size)).eval())
        self.reference = self.engine.place(reference or policy.reference_model()).eval()
        if reference is not None:
            self.reference.requires_grad_(False)
        self.engine.setup(self.policy, self.value_head, self.reference, OptimizerSettings(
            config.learning_rate, config.adam_eps, config.weight_decay, config.max_grad_norm))
        total = config.iterations * config.ppo_epochs * config.num_minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.engine.optimizer, lambda step:
                                                           lr_factor(config.lr_schedule, step,
                                                                     total, config.warmup_steps))
        self.kl_ctl = KLController(config.kl_coef, config.adaptive_kl, config.kl_target,
                                   config.kl_horizon)
        # Each rank draws its own episodes (rank 0 those of a one-process run).
        self.sample_gen = torch.Generator(self.device).manual_seed(
            config.seed + 7919 * self.world.rank)
        self.shuffle_gen = torch.Generator().manual_seed(config.seed + 1)
        self.sampler = BatchSampler(config, env, self.world, self.device, self.sample_gen)
        self.history: list[dict[str, Any]] = []
        self.last_samples: list[dict[str, Any]] = []   # the last iteration's first samples
        self.average = TailAverage()  # of the last config.average_last iterates
        self.last_iterate: dict[str, Tensor] | None = None   # set when the average replaced it
        self.output_dir = Path(config.output_dir) if config.output_dir is not None else None
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl"
                                     if self.output_dir is not None and self.world.is_main
                                     else None)
        # The counters, the state_dict and the checkpoint files (trainer_state.py).
        self.state = TrainerState(config, self.world, self.engine, env, self.policy,
                                  self.value_head, self.scheduler, self.kl_ctl, self.average,
                                  {"sample": self.sample_gen, "shuffle": self.shuffle_gen},
                                  self.metrics.path)

    @property
    def model(self) -> Any:
        """The model trained, as TRL's ``trainer.model``: an ``HFPolicy``'s ``transformers``
        model (a ``peft.PeftModel`` with LoRA); the policy itself for other policies."""
        return getattr(self.policy, "model", self.policy)

    # --- the loop --------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run the remaining iterations; returns one metrics dict per iteration run."""
        cfg = self.config
        if self.iteration == 0:
            self.start_fresh()
        self.callbacks.on_train_begin(self)
        first, stop = len(self.history), False
        while self.iteration < cfg.iterations and not stop:
            row = self.iterate()
            stop = self.world.any(bool(self.callbacks.on_iteration_end(self, row)))
            if cfg.save_every and self.iteration % cfg.save_every == 0:
                self.save()
        if self.output_dir is not None and (not cfg.save_every or self.iteration % cfg.save_every):
            self.save()
        self.callbacks.on_train_end(self, self.history[first:])
        return self.history

    def iterate(self, episodes: Episodes | None = None) -> dict[str, Any]:
        """One iteration: collect (sample, or take the given ``episodes``), compute the
        advantages (of the whole batch, over every rank), update, log, adapt the KL
        coefficient. Returns the iteration's metrics."""
        timer = Timer()
        episodes, rollout = self.collect(timer, episodes)
        with timer("time_advantages"):
            batch = self.world.gather_rollout(rollout)       # every rank's episodes
            advantages = self.compute_advantages(batch)
        with timer("time_train"):
            stats = self.update(rollout, self.world.own_rows(advantages, rollout))
        self.iteration += 1
        self.average_weights()
        row = self.log(episodes, batch, advantages, stats, timer)
        self.kl_ctl.update(row["kl"], self.config.batch_size)
        return row

    # --- phases ------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, timer: Timer | None = None, episodes: Episodes | None = None
                ) -> tuple[Episodes, Rollout]:
        """Sample a batch, keeping the policy's logprobs and states from the sampling pass
        (or, with rollout_logprobs='forward', one more forward pass of the policy); the
        critic's values; one forward of the reference over the whole sequences, at the sampling
        temperature (with kl_estimator='full', the reference's whole distribution too).
        Under torchrun, this rank's share of the batch; ``episodes``: use these instead of
        sampling (with rollout_logprobs='forward')."""
        timer = timer or Timer()
        cfg = self.config
        from_sampler = cfg.rollout_logprobs == "sampler"
        record = from_sampler or cfg.tis_cap is not None     # TIS: the sampler's too
        with self.engine.rollout():
            with timer("time_generate"):
                if episodes is None:
                    episodes = self.world.together(
                        lambda: self.sampler.sample(self.policy, record,
                                                    self.engine.sampling_trunk(self.policy)),
                        "sampling and scoring the rollout")
            timer.add("time_reward", episodes.reward_seconds)
            timer.add("time_generate", -episodes.reward_seconds)
            seqs = Sequences(episodes.input_ids, episodes.attention_mask,
                             episodes.response_mask.shape[1])
            with timer("time_forward"):
                if from_sampler:
                    assert episodes.logprobs is not None and episodes.hidden is not None
                    logprobs, hidden = episodes.logprobs, episodes.hidden
                else:
                    fwd = self.engine.forward_response(self.policy, seqs, cfg.temperature)
                    logprobs, hidden = fwd.logprobs, fwd.hidden
                values = self.values(seqs, hidden)
                ref = self.engine.forward_response(self.reference, seqs, cfg.temperature,
                                                   full_dist=cfg.kl_estimator == "full")
        rmask = episodes.response_mask.float()
        sampler = episodes.logprobs if cfg.tis_cap is not None else None
        rollout = Rollout(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                          response_mask=rmask, logprobs=logprobs.float() * rmask,
                          ref_logprobs=ref.logprobs.float() * rmask, values=values * rmask,
                          scores=episodes.scores.float(),
                          index=torch.arange(len(episodes.prompts), device=self.device),
                          ref_dist=ref.dist.float() if ref.dist is not None else None,
                          token_scores=episodes.token_scores,
                          sampler_logprobs=sampler.float() * rmask if sampler is not None
                          else None)
        return episodes, rollout

    def values(self, seqs: Sequences, policy_hidden: Tensor) -> Tensor:
        """V(s) at the positions predicting the response tokens: the value head on the
        policy's states, or on a separate critic's; zeros without a value head (critic-free).
        Shapes: -> (B, T) float32."""
        if self.value_head is None:
            return policy_hidden.new_zeros(policy_hidden.shape[:2], dtype=torch.float32)
        critic = self.value_head.critic
        hidden = self.engine.forward_hidden(critic, seqs) if critic is not None else policy_hidden
        return self.engine.value(self.value_head, hidden)

    def compute_advantages(self, rollout: Rollout) -> Advantages:
        """Per-token rewards, then the advantages of ``config.advantage_estimator`` (GAE and
        whitening by default; see ``ppolm.training.objective.estimate_advantages``)."""
        return estimate_advantages(self.config, rollout, self.kl_ctl.value)

    def update(self, rollout: Rollout, advantages: Advantages) -> dict[str, float]:
        """K epochs over shuffled minibatches; one optimizer step per minibatch."""
        cfg = self.config
        stats: dict[str, list[float]] = defaultdict(list)
        epochs_done = 0
        n, size = rollout.input_ids.shape[0], cfg.minibatch_size // self.world.size
        with self.engine.update():
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(n, generator=self.shuffle_gen).to(self.device)
                epoch_kl = []
                for start in range(0, n, size):
                    idx = perm[start: start + size]
                    step = self.optimizer_step(rollout.select(idx), advantages.select(idx))
                    if epoch == 0 and start == 0:
                        stats["ratio_dev_first"].append(step["ratio_max_dev"])
                        if cfg.rollout_logprobs == "sampler":   # pi unchanged yet: numerics
                            stats["logprob_mismatch_mean"].append(step["log_ratio_abs"])
                            stats["logprob_mismatch_max"].append(step["log_ratio_abs_max"])
                    for k, v in step.items():
                        stats[k].append(v)
                    epoch_kl.append(step["approx_kl"])
                epochs_done += 1
                if cfg.target_approx_kl is not None and np.mean(epoch_kl) > cfg.target_approx_kl:
                    break
        # The mean over the applied steps (a skipped step's statistics are NaN); NaN if none.
        out = {k: float(np.nanmean(v)) if not np.isnan(v).all() else math.nan
               for k, v in stats.items() if k not in ("skipped", *FIRST_FORWARD_STATS)}
        out["skipped_updates"] = float(np.sum(stats["skipped"]))
        out["epochs_done"] = float(epochs_done)
        return out

    def optimizer_step(self, minibatch: Rollout, advantages: Advantages) -> dict[str, float]:
        """Gradients of one minibatch, then the engine's clipped optimizer step, or a skipped
        step when the loss or the gradient norm is not finite."""
        totals = self.accumulate_gradients(minibatch, advantages)
        result = self.engine.step(loss_finite=math.isfinite(totals["loss"]))
        if result.applied:
            self.scheduler.step()
            self.state.bad_updates = 0
        else:
            # Skip the update rather than apply NaN/inf to the weights (as veRL does).
            self.state.bad_updates += 1
            if self.state.bad_updates >= self.config.max_bad_updates:
                raise TrainingError(
                    f"{self.state.bad_updates} non-finite updates in a row (loss {totals['loss']}, "
                    f"grad norm {result.grad_norm}) at iteration {self.iteration + 1}; check the "
                    "rewards and lower learning_rate. The last checkpoint is kept.")
        totals["grad_norm"] = result.grad_norm
        totals["skipped"] = 0.0 if result.applied else 1.0
        return totals

    def accumulate_gradients(self, minibatch: Rollout, advantages: Advantages
                             ) -> dict[str, float]:
        """Zero the gradients, then backward each micro-batch. Losses are normalised by the
        token count of the whole minibatch, so the accumulated gradients equal those of one
        pass over it. Returns the minibatch's loss statistics."""
        cfg = self.config
        self.engine.zero_grad()
        # Normalisers of the whole minibatch, over every rank.
        num_tokens = self.world.sum(minibatch.response_mask.sum()).clamp(min=1)
        n = minibatch.input_ids.shape[0]
        totals: dict[str, float] = defaultdict(float)
        size = cfg.minibatch_size // cfg.grad_accum_steps      # = micro_batch_size
        for start in range(0, n, size):
            idx = torch.arange(start, min(start + size, n), device=self.device)
            micro = minibatch.select(idx)
            loss, parts = self.loss(micro, advantages.select(idx), num_tokens,
                                    n * self.world.size)
            self.engine.backward(loss)
            share = float(micro.response_mask.sum() / num_tokens)
            for k, v in parts.items():
                totals[k] = max(totals[k], v) if k in MAXED_STATS else totals[k] + share * v
        return self.world.reduce_stats(dict(totals), maxed=MAXED_STATS)

    def loss(self, micro: Rollout, adv: Advantages, num_tokens: Tensor, num_seqs: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        """The PPO loss of one micro-batch (``ppolm.training.objective.ppo_loss``): the
        clipped surrogate + vf_coef * clipped value loss - ent_coef * entropy (+ beta * KL when
        the KL is in the loss); ``num_tokens`` / ``num_seqs``: the minibatch's counts."""
        cfg, mask = self.config, micro.response_mask
        seqs = Sequences(micro.input_ids, micro.attention_mask, mask.shape[1], micro.index)
        fwd = self.engine.forward_response(self.policy, seqs, cfg.temperature,
                                           entropy_grad=cfg.ent_coef > 0,
                                           full_dist=cfg.kl_estimator == "full")
        values = self.values(seqs, fwd.hidden) if self.value_head is not None else None
        return ppo_loss(cfg, fwd, values, micro, adv, num_tokens, num_seqs or mask.shape[0],
                        self.env.max_model_tokens, self.kl_ctl.value)

    def average_weights(self) -> None:
        """Tail averaging (config.average_last = N): add the policy's weights to the running
        mean after each of the last N iterations; after the last one, the policy takes the mean
        and its last iterate is kept in ``last_iterate`` (trainable weights by name)."""
        cfg = self.config
        if cfg.average_last and self.iteration > cfg.iterations - cfg.average_last:
            self.average.add(self.policy)
            if self.iteration == cfg.iterations:
                self.last_iterate = self.average.swap_in(self.policy)

    def log(self, episodes: Episodes, rollout: Rollout, advantages: Advantages,
            stats: dict[str, float], timer: Timer) -> dict[str, Any]:
        """The iteration's metrics (fixed names, see ppolm.observe.metrics) and samples."""
        cfg, mask = self.config, rollout.response_mask
        # The metric uses the optimised estimator; for the exact KL (optimised per state),
        # k1 on the sampled tokens: the unbiased estimate of the KL of whole responses.
        estimator = "k1" if cfg.kl_estimator == "full" else cfg.kl_estimator
        kl_seq = sequence_kl(rollout.logprobs, rollout.ref_logprobs, mask, estimator)  # (B,)
        total = timer.total()
        n_tokens = float(mask.sum())
        row: dict[str, Any] = {
            "iteration": self.iteration,
            **batch_metrics(rollout, advantages, kl_seq, cfg.samples_per_prompt,
                            self.value_head is not None),
            "kl_coef": self.kl_ctl.value, "lr": self.scheduler.get_last_lr()[0],
            "eos_fraction": float(self.world.sum(episodes.ended.sum())) / cfg.batch_size,
            "tokens_per_s": n_tokens / total, "episodes_per_s": cfg.batch_size / total,
            **stats, **timer.seconds, "time_total": total, **self.sampler.stats,
            **{f"reward/{k}": v for k, v in self.world.reduce_stats(
                {k: v / self.world.size for k, v in episodes.reward_parts.items()}).items()},
        }
        if episodes.turn_info is not None:      # multi-turn episodes
            row.update(turn_metrics(episodes.turn_info, self.world, cfg.batch_size))
        self.history.append(row)        # metrics.jsonl: written by a callback (trackers.py)
        self.last_samples = iteration_samples(episodes.prompts, episodes.responses,
                                              rollout.scores.tolist(), kl_seq.tolist(),
                                              episodes.turn_info)
        return row

    # --- state and files: the TrainerState's (trainer_state.py) -------------------------------
    @property
    def iteration(self) -> int:
        """Iterations completed."""
        return self.state.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.state.iteration = value

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (``TrainerState.state_dict``)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (copied: no tensor shared with its giver)."""
        self.state.load_state_dict(state)

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default: output_dir/checkpoints/iter-NNNNNNN, keeping the newest
        ``keep_checkpoints``; ``TrainerState.save``); returns its folder."""
        final = self.state.save(path)
        self.callbacks.on_save(self, final)
        return final

    def resume(self, path: str | Path | None = None) -> int:
        """Continue from a checkpoint (default: the newest complete one under output_dir) on
        the next ``train()``; returns the iteration reached."""
        return self.state.resume(path)

    def start_fresh(self) -> None:
        """Refuse to mix a new run with an earlier one in output_dir (``overwrite`` deletes
        it); ``train()`` calls it before a new run's first iteration."""
        self.state.start_fresh()

    def save_model(self, path: str | Path, merge: bool = True) -> Path:
        """The policy as a Hugging Face model folder (LoRA merged; ``merge=False``: the adapters
        alone), its tokenizer and the value head (``ppolm.checkpoint.export.save_model``)."""
        return export.save_model(self.policy, self.env.tokenizer, path, self.value_head,
                                 merge=merge)

"""EvalCallback: ``evaluate()`` on held-out prompts during training, its figures logged as
``eval/*`` metrics, and the best iteration by a chosen metric kept as a checkpoint.

The evaluation samples with its own generator, seeded by ``seed`` at every evaluation: each
one sees the same randomness (so two evaluations differ by the policy only), and the
training's random streams are untouched (a run with evaluation trains exactly as one
without, and resumes exactly).

The forward passes go through the trainer's engine (under torchrun: FSDP2's sharded models
are gathered as for a rollout). Under torchrun every rank evaluates the same prompts with the
same generator (so every rank reads the same figures and keeps the same best iteration); rank
0 alone writes the files.

Place it before the callbacks that read its metrics: the Trainer adds its own (health checks,
trackers, metrics.jsonl) after the ones it is given, so they all see ``eval/*``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

from ppolm.errors import ConfigError
from ppolm.evaluation.evaluate import EvalResult, evaluate
from ppolm.observe.callbacks import Callback, Trainer
from ppolm.rollout.env import read_prompts

#: The figures logged, as ``eval/<name>``: name -> the EvalResult attribute. ``score_*`` is
#: the reward function's score, as ``score_mean`` is in training.
EVAL_FIGURES = {"score_mean": "reward_mean", "score_std": "reward_std",
                "positive_share": "positive_share", "kl": "kl",
                "response_length": "response_length", "eos_fraction": "eos_fraction",
                "distinct_2": "distinct_2", "seconds": "seconds"}
BEST = "best"


class EvalCallback(Callback):
    """Evaluate the policy on held-out prompts every ``every`` iterations and after the last.

    Args:
        prompts: the held-out prompts (a list, a ``datasets.Dataset`` whose other columns
            reach the reward, as in training), or a prompts file (.txt, .jsonl, .json).
        every: evaluate after every this many iterations (and after the last one).
        keep_best: a metric name (e.g. ``"eval/score_mean"``, or any training metric): the
            iteration where it is best so far is saved as a checkpoint in output_dir/best
            (with best.json: the metric, its value, the iteration). Needs an output_dir.
        mode: ``"max"`` or ``"min"``: which way ``keep_best`` is better.
        seed: the sampling seed of every evaluation.
        batch_size: prompts per sampling batch, as in ``evaluate``.
        samples_per_prompt: responses per prompt, as in ``evaluate``.
        reward_fn: score the held-out responses with this instead of the training reward
            (e.g. a judge the policy is not trained on: then the hacking check of the
            HealthMonitor compares the trained reward with an independent one).
        add_special_tokens: as the training env tokenizes its prompts (False with a chat
            template).

    Sampling settings (max_new_tokens, top_k, top_p) are the training env's, the temperature
    the config's; the KL is to the Trainer's reference. Each result is also written to
    output_dir/eval/iter-NNNNNNN.json (figures and samples).
    """

    def __init__(self, prompts: Any, every: int = 10, *,
                 keep_best: str | None = None, mode: Literal["max", "min"] = "max",
                 seed: int = 0, batch_size: int = 32, samples_per_prompt: int = 1,
                 reward_fn: Any = None, add_special_tokens: bool = True) -> None:
        if callable(getattr(prompts, "to_list", None)):      # a datasets.Dataset
            prompts = prompts.to_list()         # its rows: the columns reach the reward
        self.prompts = read_prompts(prompts) if isinstance(prompts, (str, Path)) else prompts
        if not isinstance(self.prompts, list) or not self.prompts:
            raise ConfigError("EvalCallback prompts must be a non-empty list (of strings, "
                              "message lists or rows with a 'prompt' key), a datasets.Dataset "
                              "or a prompts file.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"EvalCallback every={every!r} must be an integer >= 1.")
        if mode not in ("max", "min"):
            raise ConfigError(f"EvalCallback mode={mode!r} must be 'max' or 'min'.")
        self.every, self.keep_best, self.mode, self.seed = every, keep_best, mode, seed
        self.batch_size, self.samples_per_prompt = batch_size, samples_per_prompt
        self.reward_fn, self.add_special_tokens = reward_fn, add_special_tokens
        self.results: dict[int, EvalResult] = {}      # by iteration, this process's
        self.best: dict[str, Any] | None = None       # metric, value, iteration

    # --- the hooks ------------------------------------------------------------------------
    def on_train_begin(self, trainer: Trainer) -> None:
        """Check keep_best has somewhere to go; a new run forgets an earlier best, a resumed
        one continues from the best kept up to its checkpoint."""
        if self.keep_best is None:
            return
        if trainer.output_dir is None:
            raise ConfigError(f"EvalCallback keep_best={self.keep_best!r} needs an output_dir "
                              "in the config (the best checkpoint goes to output_dir/best).")
        folder = Path(trainer.output_dir) / BEST
        info = folder / "best.json"
        saved = json.loads(info.read_text()) if info.is_file() else None
        if saved is not None and 0 < saved["iteration"] <= trainer.iteration:
            self.best = saved
        else:                            # a new run, or a best from after the checkpoint
            self.best = None
            shutil.rmtree(folder, ignore_errors=True)

    def on_iteration_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        it = int(metrics["iteration"])
        if it % self.every == 0 or it == trainer.config.iterations:
            result = self.run(trainer)
            self.results[it] = result
            metrics.update({f"eval/{name}": getattr(result, attr)
                            for name, attr in EVAL_FIGURES.items()
                            if getattr(result, attr) is not None})
            if trainer.output_dir is not None and trainer.world.is_main:
                result.save(Path(trainer.output_dir) / "eval" / f"iter-{it:07d}.json")
        if self.keep_best is not None:
            self.maybe_keep(trainer, metrics, it)

    # --- the work -------------------------------------------------------------------------
    def run(self, trainer: Trainer) -> EvalResult:
        """One evaluation of the trainer's policy (its own seeded generator)."""
        env = trainer.env
        return evaluate(trainer.policy, env.tokenizer, self.prompts,
                        self.reward_fn or env.reward_fn, trainer.reference,
                        max_new_tokens=env.max_new_tokens, temperature=trainer.config.temperature,
                        top_k=env.top_k, top_p=env.top_p, seed=self.seed,
                        batch_size=self.batch_size, add_special_tokens=self.add_special_tokens,
                        samples_per_prompt=self.samples_per_prompt, engine=trainer.engine)

    def maybe_keep(self, trainer: Trainer, metrics: dict[str, Any], it: int) -> None:
        """Save output_dir/best when the keep_best metric beats the best so far."""
        value = metrics.get(self.keep_best or "")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        if self.best is not None:
            old = self.best["value"]
            if (value <= old) if self.mode == "max" else (value >= old):
                return
        if trainer.output_dir is None:              # checked at on_train_begin
            return
        folder = trainer.save(Path(trainer.output_dir) / BEST)        # every rank writes
        self.best = {"metric": self.keep_best, "value": float(value), "iteration": it}
        if trainer.world.is_main:
            (folder / "best.json").write_text(json.dumps(self.best) + "\n")

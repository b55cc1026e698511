"""HealthMonitor: a callback that reads each iteration's metrics and warns, in plain words, when
a run shows a known failure sign, with the numbers and the usual fix.

A condition warns once per episode of trouble: while it stays true it is silent; once it has
cleared, it warns again if it comes back. A metric that is missing or not finite (e.g.
``explained_variance`` in a critic-free run, or every statistic of an iteration whose updates
were all skipped) leaves that condition as it was. The monitor never stops training.

Warnings go through ``warnings.warn`` with the category ``PPOHealthWarning`` (silence them with
``warnings.filterwarnings("ignore", category=PPOHealthWarning)``), are kept in
``monitor.warnings``, and, in a run with an output_dir, go to warnings.jsonl there (cut back to
the checkpoint on resume, like metrics.jsonl) so that ``ppolm report`` can list them.

The reward-hacking check reads ``eval/score_mean``, which an ``ppolm.EvalCallback`` placed
before the monitor adds to the metrics; without it that check stays silent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ppolm.errors import ConfigError
from ppolm.observe.callbacks import Callback, Trainer, warn_user
from ppolm.observe.metrics import MetricsWriter, truncate_metrics

#: The conditions checked, by the name each warning carries.
CONDITIONS = ("kl_high", "kl_rising", "kl_negative", "entropy_collapse", "clipfrac_high",
              "approx_kl_high", "value_not_learning", "truncated", "skipped_updates",
              "reward_hacking", "episodes_truncated", "tool_errors", "no_signal")


class PPOHealthWarning(UserWarning):
    """A training run shows a known sign of trouble (see ``HealthMonitor``)."""


def _value(metrics: dict[str, Any], name: str) -> float | None:
    """The metric as a float, or None when it is missing or not finite."""
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


class HealthMonitor(Callback):
    """Warns once per episode of trouble when the metrics show a known failure sign.

    Args:
        kl_factor: warn when the KL to the reference (metric ``kl``, nats per response) is over
            this multiple of its target. Default 2.0.
        kl_limit: the target for that check when the run does not adapt its KL coefficient
            (``adaptive_kl=False``); with ``adaptive_kl`` it is ``config.kl_target``. Default
            10.0 nats (so a fixed-coefficient run warns over 20 nats by default).
        kl_rising_iterations: warn when the KL has risen this many iterations in a row. Default 5.
        kl_rising_floor: ... counting only rises to a KL over this fraction of the target, so the
            usual climb from 0 at the start of a run does not warn. Default 0.5; 0 counts every
            rise.
        negative_kl: warn when the mean KL is below this (nats). On the sampled tokens the k1
            estimate averages to the (non-negative) KL only if the tokens were drawn from the
            policy it scores; clearly negative, sampling and training disagree (a temperature
            or logprob mismatch). Default -0.1.
        entropy_fraction: warn when the entropy (nats per token) falls below this fraction of
            its value at the first iteration the monitor sees (entropy collapse). Default 0.1.
        clipfrac_limit: warn when the fraction of clipped ratios is over this. Default 0.3.
        approx_kl_limit: warn when ``approx_kl`` (the KL between the sampling policy and the
            updated one) is over this. Default 0.1.
        value_iterations: warn when the explained variance of the value function has been below
            0 this many iterations in a row (runs with a value function only). Default 5.
        truncated_fraction: warn when more than this fraction of the batch hit the length
            limit without an end token (``eos_fraction`` below 1 minus it). Default 0.8.
        hacking_evals: warn when, over this many evaluations in a row, the training score
            (``score_mean``, averaged over the iterations since the evaluation before) rose
            each time while the score on the held-out prompts (``eval/score_mean``) fell each
            time: the policy gains on its training prompts what it loses elsewhere, the sign
            of reward hacking (or of overfitting the training prompts). Default 2.
        truncated_episodes: multi-turn runs: warn when more than this fraction of the episodes
            were cut by ``max_turns`` or ``max_episode_tokens`` (``truncated_fraction``).
            Default 0.5.
        tool_errors_limit: multi-turn runs with tools: warn when the episodes average more
            failed tool calls than this (``tool_errors_mean``). Default 1.0.

    Any skipped non-finite update (``skipped_updates`` > 0) also warns.
    """

    def __init__(self, kl_factor: float = 2.0, kl_limit: float = 10.0,
                 kl_rising_iterations: int = 5, kl_rising_floor: float = 0.5,
                 negative_kl: float = -0.1, entropy_fraction: float = 0.1,
                 clipfrac_limit: float = 0.3, approx_kl_limit: float = 0.1,
                 value_iterations: int = 5, truncated_fraction: float = 0.8,
                 hacking_evals: int = 2, truncated_episodes: float = 0.5,
                 tool_errors_limit: float = 1.0) -> None:
        for name, value in (("kl_factor", kl_factor), ("kl_limit", kl_limit),
                            ("approx_kl_limit", approx_kl_limit),
                            ("tool_errors_limit", tool_errors_limit)):
            if not value > 0:
                raise ConfigError(f"HealthMonitor {name}={value} must be > 0.")
        for name, count in (("kl_rising_iterations", kl_rising_iterations),
                            ("value_iterations", value_iterations),
                            ("hacking_evals", hacking_evals)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"HealthMonitor {name}={count!r} must be an integer >= 1.")
        for name, value in (("kl_rising_floor", kl_rising_floor),
                            ("entropy_fraction", entropy_fraction),
                            ("clipfrac_limit", clipfrac_limit),
                            ("truncated_fraction", truncated_fraction),
                            ("truncated_episodes", truncated_episodes)):
            if not 0 <= value <= 1:
                raise ConfigError(f"HealthMonitor {name}={value} must be in [0, 1].")
        if not negative_kl <= 0:
            raise ConfigError(f"HealthMonitor negative_kl={negative_kl} must be <= 0 "
                              "(e.g. -0.1): a positive KL is normal.")
        self.kl_factor, self.kl_limit = float(kl_factor), float(kl_limit)
        self.kl_rising_iterations, self.kl_rising_floor = kl_rising_iterations, kl_rising_floor
        self.negative_kl, self.entropy_fraction = float(negative_kl), float(entropy_fraction)
        self.clipfrac_limit, self.approx_kl_limit = float(clipfrac_limit), float(approx_kl_limit)
        self.value_iterations, self.truncated_fraction = value_iterations, truncated_fraction
        self.hacking_evals = hacking_evals
        self.truncated_episodes, self.tool_errors_limit = truncated_episodes, tool_errors_limit
        #: Every warning given: dicts of ``iteration``, ``name`` (one of CONDITIONS), ``message``.
        self.warnings: list[dict[str, Any]] = []
        self.active: set[str] = set()         # conditions in an episode of trouble
        self.first_entropy: float | None = None
        self.last_kl: float | None = None
        self.kl_rises = 0                      # iterations in a row the KL rose (over the floor)
        self.value_bad = 0                     # iterations in a row explained variance < 0
        self.seen = 0                          # iterations checked
        self.train_scores: list[float] = []    # score_mean since the last evaluation
        self.evals: list[tuple[Any, float, float]] = []   # (iteration, train score, eval score)
        self.path: Path | None = None          # warnings.jsonl, in a run with an output_dir

    def on_train_begin(self, trainer: Trainer) -> None:
        """Find warnings.jsonl: a new run starts it afresh, a resumed one cuts it back."""
        output_dir = getattr(trainer, "output_dir", None)
        if output_dir is None:
            return
        self.path = Path(output_dir) / "warnings.jsonl"
        if trainer.iteration == 0:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, trainer.iteration)

    # --- the hook ----------------------------------------------------------------------------
    def on_iteration_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Check the iteration's metrics; warn for each condition that has just become true."""
        config = trainer.config
        self.seen += 1
        it = metrics.get("iteration", self.seen)
        checks = {
            "kl_high": self._kl_high(config, metrics, it),
            "kl_rising": self._kl_rising(config, metrics, it),
            "kl_negative": self._kl_negative(config, metrics, it),
            "entropy_collapse": self._entropy(config, metrics, it),
            "clipfrac_high": self._clipfrac(config, metrics, it),
            "approx_kl_high": self._approx_kl(config, metrics, it),
            "value_not_learning": self._explained_variance(config, metrics, it),
            "truncated": self._truncated(config, metrics, it),
            "skipped_updates": self._skipped(config, metrics, it),
            "reward_hacking": self._hacking(config, metrics, it),
            "episodes_truncated": self._episodes_truncated(metrics, it),
            "tool_errors": self._tool_errors(metrics, it),
            "no_signal": self._no_signal(config, metrics, it),
        }
        for name, result in checks.items():
            if result is None:                  # unknown this iteration: no change
                continue
            if not isinstance(result, str):     # fine: the episode (if any) is over
                self.active.discard(name)
            elif name not in self.active:
                self.active.add(name)
                self.warn(it, name, result)
        return None

    def warn(self, iteration: Any, name: str, message: str) -> None:
        """Record a warning and issue it as a PPOHealthWarning."""
        self.warnings.append({"iteration": iteration, "name": name, "message": message})
        MetricsWriter(self.path).write(self.warnings[-1])
        warn_user(message, PPOHealthWarning)

    # --- the conditions: None (unknown), False (fine) or the message -------------------------
    def kl_target(self, config: Any) -> tuple[float, str]:
        """The KL the run aims at, and its name in a message."""
        if config.adaptive_kl:
            return float(config.kl_target), "its target (kl_target)"
        return self.kl_limit, "the limit (HealthMonitor kl_limit)"

    def _kl_high(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        kl = _value(m, "kl")
        if kl is None:
            return None
        target, what = self.kl_target(config)
        if kl <= self.kl_factor * target:
            return False
        coef = _value(m, "kl_coef")
        coef_s = f"{coef:.3g}" if coef is not None else "?"
        fix = (f"the adaptive controller is not holding it (kl_coef now {coef_s}); lower "
               "learning_rate or kl_horizon." if config.adaptive_kl else
               f"the policy is drifting; raise kl_coef (now {coef_s}) or lower learning_rate.")
        return (f"KL to the reference is {kl:.3g} nats at iteration {it}, over "
                f"{self.kl_factor:g}x {what} of {target:g} nats: {fix}")

    def _kl_rising(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        kl = _value(m, "kl")
        if kl is None:
            self.last_kl, self.kl_rises = None, 0
            return None
        target, _ = self.kl_target(config)
        rose = self.last_kl is not None and kl > self.last_kl
        self.kl_rises = self.kl_rises + 1 if rose and kl > self.kl_rising_floor * target else 0
        self.last_kl = kl
        if self.kl_rises < self.kl_rising_iterations:
            return False
        return (f"KL to the reference has risen {self.kl_rises} iterations in a row, to "
                f"{kl:.3g} nats at iteration {it} (target {target:g} nats): the KL penalty is not "
                "holding the policy; raise kl_coef or lower learning_rate.")

    def _kl_negative(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        kl = _value(m, "kl")
        if kl is None:
            return None
        if kl >= self.negative_kl:
            return False
        return (f"Mean KL to the reference is {kl:.3g} nats at iteration {it}, below "
                f"{self.negative_kl:g}: the sampled tokens look likelier under the reference than "
                "under the policy that drew them, so sampling and training disagree (usually a "
                "temperature or logprob mismatch, e.g. a custom sampler). Try "
                "rollout_logprobs='forward', which scores the tokens with the training forward.")

    def _entropy(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        ent = _value(m, "entropy")
        if ent is None:
            return None
        if self.first_entropy is None:
            self.first_entropy = ent
        floor = self.entropy_fraction * self.first_entropy
        if ent >= floor or self.first_entropy <= 0:
            return False
        return (f"Entropy is {ent:.3g} nats per token at iteration {it}, under "
                f"{self.entropy_fraction:.0%} of its first value ({self.first_entropy:.3g}): "
                "the policy is collapsing onto a few responses; raise kl_coef or ent_coef, or "
                "lower learning_rate.")

    def _clipfrac(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        clip = _value(m, "clipfrac")
        if clip is None or getattr(config, "ratio_level", "token") == "sequence":
            return None          # GSPO clips whole sequences at a tiny range by design
        if clip <= self.clipfrac_limit:
            return False
        return (f"Clip fraction is {clip:.3g} at iteration {it}, over {self.clipfrac_limit:g}: "
                f"updates move the policy too far for clip_range={config.clip_range:g}; lower "
                "learning_rate or ppo_epochs, or set target_approx_kl.")

    def _no_signal(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        share = _value(m, "zero_signal_groups")
        if share is None or getattr(config, "dynamic_sampling", False):
            return None
        if share <= 0.5:
            return False
        return (f"{share:.0%} of the prompt groups at iteration {it} scored all alike: their "
                "advantages are 0, so they train on nothing. Set dynamic_sampling=True to "
                "sample other groups in their place, or raise samples_per_prompt.")

    def _approx_kl(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        akl = _value(m, "approx_kl")
        if akl is None:
            return None
        if akl <= self.approx_kl_limit:
            return False
        stop = ("lower target_approx_kl (now "
                f"{config.target_approx_kl:g})" if config.target_approx_kl is not None else
                "set target_approx_kl (e.g. 0.05) to stop an iteration's epochs early")
        return (f"approx_kl is {akl:.3g} at iteration {it}, over {self.approx_kl_limit:g}: each "
                "update moves the policy far from the one that sampled the batch; lower "
                f"learning_rate or {stop}.")

    def _explained_variance(self, config: Any, m: dict[str, Any], it: Any
                            ) -> str | bool | None:
        ev = _value(m, "explained_variance")
        if ev is None:
            self.value_bad = 0
            return None
        self.value_bad = self.value_bad + 1 if ev < 0 else 0
        if self.value_bad < self.value_iterations:
            return False
        return (f"Explained variance has been below 0 for {self.value_bad} iterations "
                f"({ev:.3g} at iteration {it}): the value function predicts the returns worse "
                "than their mean; whiten_rewards=True or smaller rewards, a higher vf_coef or a "
                "looser clip_range_value usually help.")

    def _truncated(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        eos = _value(m, "eos_fraction")
        if eos is None:
            return None
        cut = 1.0 - eos
        if cut <= self.truncated_fraction:
            return False
        return (f"{cut:.0%} of the responses hit the length limit without an end token at "
                f"iteration {it} (over {self.truncated_fraction:.0%}): the reward judges cut-off "
                "text; raise max_new_tokens, or penalise such responses (missing_eos_penalty).")

    def _episodes_truncated(self, m: dict[str, Any], it: Any) -> str | bool | None:
        cut = _value(m, "truncated_fraction")
        if cut is None:
            return None
        if cut <= self.truncated_episodes:
            return False
        return (f"{cut:.0%} of the episodes were cut by max_turns or max_episode_tokens at "
                f"iteration {it} (over {self.truncated_episodes:.0%}): the reward judges "
                "conversations that did not finish; raise max_turns or max_episode_tokens, or "
                "read the samples' turns (samples.jsonl) to see why the model does not finish.")

    def _tool_errors(self, m: dict[str, Any], it: Any) -> str | bool | None:
        errors = _value(m, "tool_errors_mean")
        if errors is None:
            return None
        if errors <= self.tool_errors_limit:
            return False
        return (f"Episodes made {errors:.3g} failed tool calls each on average at iteration "
                f"{it} (over {self.tool_errors_limit:g}): unknown tools, malformed calls or "
                "wrong arguments; read the samples' turns (samples.jsonl) for the error "
                "replies, and check the tools' schemas in the prompt and the call parser.")

    def _skipped(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        skipped = _value(m, "skipped_updates")
        if skipped is None:
            return None
        if skipped <= 0:
            return False
        epochs = _value(m, "epochs_done")
        of = f" of {epochs * config.num_minibatches:g}" if epochs is not None else ""
        return (f"{skipped:g}{of} updates at iteration {it} were skipped because the loss or the "
                "gradient norm was not finite: check the rewards for NaN or inf and lower "
                f"learning_rate (training stops after max_bad_updates={config.max_bad_updates} "
                "in a row).")

    def _hacking(self, config: Any, m: dict[str, Any], it: Any) -> str | bool | None:
        score = _value(m, "score_mean")
        if score is not None:
            self.train_scores.append(score)
        held_out = _value(m, "eval/score_mean")
        if held_out is None or not self.train_scores:
            return None
        self.evals.append((it, sum(self.train_scores) / len(self.train_scores), held_out))
        self.train_scores = []
        last = self.evals[-self.hacking_evals - 1:]
        if len(last) <= self.hacking_evals:
            return False
        pairs = list(zip(last, last[1:], strict=False))
        if not all(b[1] > a[1] and b[2] < a[2] for a, b in pairs):
            return False
        (i0, t0, e0), (_, t1, e1) = last[0], last[-1]
        return (f"The training score rose from {t0:.3g} to {t1:.3g} over the last "
                f"{self.hacking_evals} evaluations (iterations {i0} to {it}) while the score "
                f"on the held-out prompts fell from {e0:.3g} to {e1:.3g}: the policy is "
                "likely exploiting the reward on its training prompts (reward hacking) or "
                "overfitting them. Read the samples, raise kl_coef, and keep the best "
                "checkpoint by the held-out score (EvalCallback keep_best='eval/score_mean').")

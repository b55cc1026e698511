"""Named recipes: the settings each published method trains with, as PPOConfig fields.

A recipe fixes what defines its method (the estimator, where the KL acts and how much, the
clipping, the ratio level, the loss aggregation, dynamic sampling) and leaves the run's sizes
(batch, learning rate, iterations) to the user. ``samples_per_prompt`` is 4 in the grouped
recipes so that they run at the default batch size; the papers sample more (GRPO 64, DAPO 16,
GSPO 16): raise it with the batch. Every setting can be overridden:
``PPOConfig.recipe("dapo", samples_per_prompt=8, batch_size=64)``; in a run's YAML,
``ppo: {recipe: dapo, ...}`` or the override ``ppo.recipe=dapo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ppolm.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """A method's settings and where they come from."""

    settings: dict[str, Any]
    reference: str
    note: str = ""


RECIPES: dict[str, Recipe] = {
    "ppo": Recipe(
        {"advantage_estimator": "gae", "kl_mode": "reward", "kl_estimator": "k1",
         "clip_range": 0.2, "whiten_advantages": True, "samples_per_prompt": 1},
        "Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022 (InstructGPT)",
        "PPO with a value function and GAE, the KL to the reference in the reward."),
    "grpo": Recipe(
        {"advantage_estimator": "grpo", "samples_per_prompt": 4, "kl_mode": "loss",
         "kl_estimator": "k3", "kl_coef": 0.04, "loss_aggregation": "seq-mean-token-mean",
         "ppo_epochs": 1},
        "Shao et al. 2024 (DeepSeekMath)",
        "group-normalised advantages, k3 KL in the loss (beta 0.04), each sequence's token "
        "mean."),
    "dr_grpo": Recipe(
        {"advantage_estimator": "dr_grpo", "samples_per_prompt": 4, "kl_coef": 0.0,
         "loss_aggregation": "seq-mean-token-sum-norm", "ppo_epochs": 1},
        "Liu et al. 2025 (Understanding R1-Zero-Like Training)",
        "no division by the group's std nor by the response's length; no KL."),
    "dapo": Recipe(
        {"advantage_estimator": "grpo", "samples_per_prompt": 4, "kl_coef": 0.0,
         "clip_range": 0.2, "clip_range_high": 0.28, "dynamic_sampling": True,
         "loss_aggregation": "token-mean", "ppo_epochs": 1},
        "Yu et al. 2025 (DAPO)",
        "clip-higher (0.2 / 0.28), dynamic sampling, the token mean, no KL. DAPO's fourth "
        "piece, the soft overlong punishment, is a reward term of the environment: "
        "TextGenerationEnv(overlong_buffer=...) (YAML env.overlong_buffer)."),
    "gspo": Recipe(
        {"advantage_estimator": "grpo", "samples_per_prompt": 4, "kl_coef": 0.0,
         "ratio_level": "sequence", "clip_range": 3e-4, "clip_range_high": 4e-4,
         "loss_aggregation": "seq-mean-token-mean", "ppo_epochs": 1},
        "Zheng et al. 2025 (Group Sequence Policy Optimization)",
        "sequence-level ratios clipped at 3e-4 below and 4e-4 above, no KL."),
    "rloo": Recipe(
        {"advantage_estimator": "rloo", "samples_per_prompt": 4, "ppo_epochs": 1},
        "Ahmadian et al. 2024 (Back to Basics: REINFORCE-style optimisation for RLHF)",
        "the leave-one-out baseline of the other k - 1 responses."),
    "reinforce_pp": Recipe(
        {"advantage_estimator": "reinforce_pp", "samples_per_prompt": 1, "kl_mode": "reward",
         "ppo_epochs": 1},
        "Hu 2025 (REINFORCE++)",
        "returns of the score and the per-token KL penalty, whitened over the batch."),
}


def recipe_settings(name: Any) -> dict[str, Any]:
    """The settings of the recipe ``name`` (a new dict), or a ConfigError naming the
    recipes."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)} (see "
                          "docs/configuration.md, 'Recipes').")
    return dict(RECIPES[name].settings)


def with_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """Flat PPOConfig values with their ``recipe`` key (if any) expanded: the recipe's settings
    first, the values given beside it over them."""
    if "recipe" not in values:
        return values
    rest = {k: v for k, v in values.items() if k != "recipe"}
    return {**recipe_settings(values["recipe"]), **rest}

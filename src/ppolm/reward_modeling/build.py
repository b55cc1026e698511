"""A ready RewardModelTrainer from a RewardModelSpec (what ``ppolm train-rm`` reads)."""

from __future__ import annotations

from typing import Any

from ppolm.config.reward_model import RewardModelSpec
from ppolm.reward_modeling.trainer import RewardModelTrainer


def build_reward_model_run(spec: RewardModelSpec) -> RewardModelTrainer:
    """The model and tokenizer ``spec.model`` names (smollm2, or a local folder), LoRA when
    ``spec.lora`` asks, and the trainer over ``spec.train`` (and ``spec.eval``)."""
    from ppolm.policies import pretrained

    model: Any
    if spec.model == "smollm2":
        model, tokenizer = pretrained.load_smollm2()
    else:
        model, tokenizer = spec.model, pretrained.load_tokenizer(spec.model)
    return RewardModelTrainer(model, tokenizer, spec.train, spec.training, eval_data=spec.eval,
                              columns=spec.columns or None, peft_config=_lora(spec.lora))


def _lora(values: dict[str, Any] | None) -> Any:
    """A ``peft.LoraConfig`` for the trunk (no task type: the trunk is a base model, not a
    causal LM)."""
    if values is None:
        return None
    from ppolm.config.lora import lora_settings

    try:
        import peft
    except ImportError:
        from ppolm.errors import ConfigError

        raise ConfigError("LoRA needs the peft package: pip install peft") from None
    return peft.LoraConfig(**lora_settings(values))

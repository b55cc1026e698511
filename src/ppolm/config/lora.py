"""The ``model.lora`` mapping of a run's YAML, checked without peft (so a run spec is
checked before any model loads); ``ppolm.policies.lora`` builds the ``peft.LoraConfig``."""

from __future__ import annotations

import difflib
from typing import Any

from ppolm.errors import ConfigError

#: The YAML keys of ``model.lora`` and the ``peft.LoraConfig`` fields they set.
LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "target_modules": "target_modules",
             "dropout": "lora_dropout", "layers": "layers_to_transform"}


def lora_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The ``LoraConfig`` keyword arguments of the YAML mapping ``model.lora``, checked
    (without peft, so a run spec is checked before any model loads): ``r`` (rank, default
    16), ``alpha`` (default 2 * r), ``target_modules`` (module names, or ``"all-linear"``;
    default peft's choice for the architecture) and ``dropout`` (default 0; PPO runs the
    policy in eval mode, where dropout is off anyway), ``layers`` (the decoder layers that get
    adapters, e.g. the top ones, so that the lower layers stay the base model's; default
    all)."""
    unknown = sorted(set(values) - set(LORA_KEYS))
    if unknown:
        peft_names = {v: k for k, v in LORA_KEYS.items()}      # lora_alpha -> alpha
        close = ([peft_names[unknown[0]]] if unknown[0] in peft_names
                 else difflib.get_close_matches(unknown[0], list(LORA_KEYS), n=1))
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.lora: unknown key(s) {unknown}; use {list(LORA_KEYS)}.{hint}")
    r = values.get("r", 16)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"model.lora.r={r!r} must be an int > 0 (the adapters' rank).")
    alpha = values.get("alpha", 2 * r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"model.lora.alpha={alpha!r} must be a number > 0.")
    dropout = values.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0 <= dropout < 1:
        raise ConfigError(f"model.lora.dropout={dropout!r} must be in [0, 1).")
    targets = values.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"model.lora.target_modules={targets!r} must be a list of module "
                          "names (e.g. [q_proj, v_proj]) or 'all-linear'.")
    layers = values.get("layers")
    if layers is not None and not (isinstance(layers, list) and layers and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise ConfigError(f"model.lora.layers={layers!r} must be a list of decoder-layer "
                          "indices (ints >= 0), e.g. [20, 21, ..., 29].")
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout),
            "target_modules": targets, "layers_to_transform": layers}

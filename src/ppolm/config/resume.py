"""What a resumed run may change: the settings of the checkpoint against the new ones.

A resume continues the run that was saved, so the settings that define it stay: the loop
sizes, the sampling, the estimator and the losses, the KL control, the seed, the model, the
prompts and the reward. A few may change, and then take effect:

* ``iterations`` may grow (run longer; the learning-rate schedule is spread over the new
  total);
* ``learning_rate`` may change (from the next optimizer step, through the schedule);
* the system settings except ``seed`` (engine, device, precision, the fast CPU engine's
  switches, ...): how the numbers are computed, not which;
* the run settings (output_dir, progress, report_to, save_every, ...) and, in a run spec, the
  evaluation (eval_prompts, eval_every, keep_best).

Anything else that differs is refused with one ConfigError that lists every such setting
with its saved and new values (``check_resume``). Pure functions; ``Trainer.resume`` and the
``ppolm train --resume`` command call them before loading anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ppolm.config.ppo import SECTIONS, PPOConfig, natural_kl_mode
from ppolm.config.sections import RunConfig, SystemConfig
from ppolm.config.yaml_io import load_yaml_mapping
from ppolm.errors import ConfigError

Changes = dict[str, tuple[Any, Any]]
#: PPOConfig settings a resume may change (``iterations`` only upward).
MAY_CHANGE = frozenset({"iterations", "learning_rate"}
                       | {f.name for f in dataclasses.fields(SystemConfig) if f.name != "seed"}
                       | {f.name for f in dataclasses.fields(RunConfig)})
#: Run spec keys (beside ``ppo``) a resume may change.
SPEC_MAY_CHANGE = frozenset({"eval_prompts", "eval_every", "keep_best"})


def resume_changes(saved: PPOConfig | Mapping[str, Any], new: PPOConfig | Mapping[str, Any]
                   ) -> tuple[Changes, Changes]:
    """The settings that differ between the checkpoint's config ``saved`` and ``new`` (each a
    PPOConfig, or its values as ``to_yaml`` writes them: flat or by section), split into
    ``(applied, refused)``, each ``{name: (saved value, new value)}``. A setting one side does
    not hold (a checkpoint from an older ppolm) is not compared."""
    return _split(_flat(saved), _flat(new), "")


def run_spec_changes(saved: Mapping[str, Any], new: Mapping[str, Any]
                     ) -> tuple[Changes, Changes]:
    """As ``resume_changes`` for two run specs' values (``RunSpec.to_dict()``, or a run.yaml
    as the command wrote it), with dotted names (``model.kind``, ``ppo.seed``): ``ppo`` by
    PPOConfig's rule, the evaluation keys may change, every other key (model, sampling, env,
    task, prompts, reward, ...) may not."""
    return _split(_dotted(saved), _dotted(new), "ppo.")


def _split(old: dict[str, Any], now: dict[str, Any], ppo: str) -> tuple[Changes, Changes]:
    """(applied, refused) between two flat mappings; ``ppo``: the prefix of PPOConfig's names
    ('' for a PPOConfig alone), the others are run spec keys."""
    applied: Changes = {}
    refused: Changes = {}
    for key, value in now.items():
        if key not in old or old[key] == value:
            continue
        if key.startswith(ppo):
            name = key[len(ppo):]
            ok = name in MAY_CHANGE and not (name == "iterations" and value < old[key])
        else:
            ok = key.split(".")[0] in SPEC_MAY_CHANGE
        (applied if ok else refused)[key] = (old[key], value)
    return applied, refused


def check_resume(refused: Changes) -> None:
    """A ConfigError listing every refused change, or nothing."""
    if not refused:
        return
    lines = "; ".join(f"{k}: {a!r} -> {b!r}" + (" (may only grow)" if k.endswith("iterations")
                                                  else "")
                      for k, (a, b) in refused.items())
    raise ConfigError(f"A resume continues the saved run, and these settings differ from the "
                      f"checkpoint's: {lines}. Put them back, or start a new run (another "
                      "output_dir, or overwrite=true). A resume may change iterations (to run "
                      "longer), learning_rate, the system settings except seed, and the run "
                      "settings (output, progress, trackers).")


def check_checkpoint_config(folder: str | Path, new: PPOConfig) -> Changes:
    """Compare a checkpoint folder's ``config.yaml`` with ``new``: a ConfigError for the
    changes a resume refuses; returns the applied ones. A folder without one (written
    elsewhere) is not compared."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return {}
    applied, refused = resume_changes(load_yaml_mapping(path), new)
    check_resume(refused)
    return applied


def _flat(values: PPOConfig | Mapping[str, Any]) -> dict[str, Any]:
    """PPOConfig values as ``to_yaml`` writes them (by section) or flat, made flat, with the
    kl_mode in use (None, the estimator's choice, resolved: a checkpoint may hold either)."""
    if isinstance(values, PPOConfig):
        return {**values.to_dict(), "kl_mode": values.kl_mode}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, Mapping):
            out.update(value)
        else:
            out[key] = value
    if out.get("kl_mode") is None and "advantage_estimator" in out:
        out["kl_mode"] = natural_kl_mode(out["advantage_estimator"],
                                         out.get("kl_estimator", "k1"))
    return out


def _dotted(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == "ppo" and isinstance(value, Mapping):
            out.update({f"ppo.{k}": v for k, v in _flat(value).items()})
        elif key in ("model", "sampling", "env") and isinstance(value, Mapping):
            out.update(_dotted(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

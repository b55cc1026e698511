"""Runs under ``torchrun`` for tests/test_reward_model_fsdp.py: a reward model trained with
FSDP2 (``distributed='fsdp'``) on gloo ranks. ``python rm_fsdp_worker.py DIR``, DIR holding
``base/`` (a tiny causal LM and its tokenizer), ``pairs.jsonl`` and ``rm.yaml`` (the test
writes them); in order:

* ``update``: one step through the Python API; rank 0 writes the whole weights after it
  (DIR/update.pt), save_model's folder (DIR/update-model) and the trainer's own scores of
  ``TEXTS`` (DIR/update-scores.pt).
* ``cli``: ``ppolm train-rm rm.yaml distributed=fsdp`` into DIR/cli (its exit status in
  DIR/cli-status.txt).
* ``resume``: 4 steps with a checkpoint every 2, uninterrupted (DIR/whole) and stopped after
  step 2 then resumed in a new trainer (DIR/resumed); rank 0 writes both final weights and
  whether every rank's AdamW shards are equal (DIR/resume.pt).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ppolm import Callback
from ppolm.cli import main
from ppolm.config.reward_model import RewardModelConfig
from ppolm.policies.pretrained import load_tokenizer
from ppolm.policies.reward_model import pad_right
from ppolm.reward_modeling import ranks
from ppolm.reward_modeling.trainer import RewardModelTrainer

#: The settings of the Python API's runs (both sides of each comparison).
SETTINGS: dict[str, Any] = dict(batch_size=8, learning_rate=1e-3, lr_schedule="constant",
                                eval_fraction=0.25, eval_every=1, progress=False)
TEXTS = ["jabca", "jbbbbbbb", "jaaaa", "jcab"]


def make_trainer(folder: Path, **settings: Any) -> RewardModelTrainer:
    """A trainer of the tiny model in ``folder/base`` on ``folder/pairs.jsonl``."""
    cfg = RewardModelConfig(**{**SETTINGS, **settings})
    return RewardModelTrainer(str(folder / "base"), load_tokenizer(folder / "base"),
                              str(folder / "pairs.jsonl"), cfg)


def whole_weights(t: RewardModelTrainer) -> dict[str, torch.Tensor]:
    """The model's whole weights (gathered from the shards under FSDP2; every rank calls)."""
    if t.sharded:
        return ranks.full_state(t.model)
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@torch.no_grad()
def scores(t: RewardModelTrainer) -> torch.Tensor:
    tok = t.tokenizer
    ids, mask = pad_right([tok(s)["input_ids"] for s in TEXTS], t.pad_id, t.device)
    out = t.model(ids, mask)                                                  # (4,)
    ranks.reshard(t.model, t.sharded)
    return out


def update(folder: Path) -> None:
    t = make_trainer(folder, steps=1, distributed="fsdp")
    t.train()
    state = whole_weights(t)
    ours = scores(t)
    t.save_model(folder / "update-model")
    if t.world.is_main:
        torch.save({"state": state, "row": t.history[-1]}, folder / "update.pt")
        torch.save(ours, folder / "update-scores.pt")


def cli(folder: Path) -> None:
    status = main(["train-rm", str(folder / "rm.yaml"), "distributed=fsdp",
                   f"output_dir={folder / 'cli'}"])
    if dist.get_rank() == 0:
        (folder / "cli-status.txt").write_text(str(status))


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_iteration_end(self, trainer: Any, metrics: dict[str, Any]) -> bool | None:
        return metrics["iteration"] == self.step or None


def resume(folder: Path) -> None:
    run = dict(steps=4, save_every=2, distributed="fsdp")
    whole = make_trainer(folder, output_dir=str(folder / "whole"), **run)
    whole.train()
    first = make_trainer(folder, output_dir=str(folder / "resumed"), **run)
    first.callbacks.callbacks.insert(0, StopAt(2))
    first.train()
    again = make_trainer(folder, output_dir=str(folder / "resumed"), **run)
    reached = again.resume()
    again.train()
    a, b = whole.state_dict()["optimizer"]["state"], again.state_dict()["optimizer"]["state"]
    same = torch.tensor(int(a.keys() == b.keys() and all(
        torch.equal(a[k][s].to_local(), b[k][s].to_local()) for k in a
        for s in ("exp_avg", "exp_avg_sq"))))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    wa, wb = whole_weights(whole), whole_weights(again)
    if whole.world.is_main:
        torch.save({"whole": wa, "resumed": wb, "reached": reached,
                    "optimizer_equal": bool(same)}, folder / "resume.pt")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    update(root)
    cli(root)
    resume(root)

"""Runs under ``torchrun`` for tests/test_dynamic_sampling.py: ``python dynamic_worker.py OUT``
trains two iterations of grpo with dynamic sampling on a small TransformerPolicy, on a task
where three of eight prompts never give a signal; each rank writes what it trained on and the
iterations' metrics to OUT/rank-RANK.json."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ppolm import (
    CallableReward,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    char_tokenizer,
)
from ppolm.maths.estimators import zero_signal_groups

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]
FLAT = ("a", "cd", "e")


def flat_or_count(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.5 if p in FLAT else r.count("a") / 8 + r.count("b") / 16
            for p, r in zip(prompts, responses, strict=True)]


def main(out: Path) -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    tok = char_tokenizer("abcdefghij")
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(flat_or_count), max_new_tokens=8)
    cfg = PPOConfig(iterations=2, batch_size=16, minibatch_size=8, ppo_epochs=1,
                    samples_per_prompt=4, advantage_estimator="grpo", dynamic_sampling=True,
                    max_sampling_rounds=8, progress=False, seed=0)
    trainer = Trainer(TransformerPolicy(len(tok), hidden_size=32), env, cfg)
    trained = []
    for _ in range(2):
        episodes, _ = trainer.collect()
        trained.append({"prompts": episodes.prompts,
                        "empty": zero_signal_groups(episodes.scores, 4).tolist()})
    rows = trainer.train()
    rank = dist.get_rank()
    (out / f"rank-{rank}.json").write_text(json.dumps(
        {"trained": trained, "rows": rows, "env": trainer.env.state_dict()["pos"]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Runs under ``torchrun`` for tests/test_distributed_averaging.py (and under plain ``python``
for the one-process side). ``python average_worker.py OUT``:

for each strategy (STRATEGIES on the ranks, comma-separated: fsdp, ddp; the plain engine in one
process), a run of
ITERATIONS iterations with tail averaging over the last AVERAGE, each iteration on FIXED
episodes (the whole batch sampled once from the initial policy with the same generator on every
rank, each rank keeping its share), a checkpoint after each; then a fresh Trainer resumed from
the checkpoint of iteration RESUME_AT (inside the tail) runs the rest. Rank 0 writes the final
weights of both, and the last iterate (gathered whole), to OUT/STRATEGY.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from worker import ALPHABET, PROMPTS, count_a, full_state, rows, tiny_llama

from ppolm import PPOConfig, TextGenerationEnv, Trainer, char_tokenizer
from ppolm.rollout.rewards import CallableReward

ITERATIONS, AVERAGE, RESUME_AT = 4, 3, 2


def build(strategy: str, out: Path) -> Trainer:
    tok = char_tokenizer(ALPHABET)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=4, seed=0)
    # (one minibatch of the whole batch: the ranks' shuffles of their rows cannot differ from
    # one process's)
    config = PPOConfig(iterations=ITERATIONS, average_last=AVERAGE, batch_size=8,
                       minibatch_size=8, ppo_epochs=2, learning_rate=1e-2, kl_coef=0.1,
                       rollout_logprobs="forward", engine="plain", progress=False,
                       output_dir=str(out), keep_checkpoints=ITERATIONS,
                       distributed="ddp" if strategy == "single" else strategy)  # type: ignore[arg-type]
    return Trainer(tiny_llama(len(tok)), env, config)


def run(trainer: Trainer, batches: list, rank: int, world: int) -> None:
    """The iterations left, each on this rank's share of its fixed batch, saving after each."""
    n = 8 // world
    while trainer.iteration < ITERATIONS:
        whole = batches[trainer.iteration]
        trainer.iterate(episodes=rows(whole, slice(rank * n, (rank + 1) * n)))
        trainer.save()


def whole(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in weights.items()}


def main(out: Path) -> None:
    torchrun = "MASTER_ADDR" in os.environ
    tok = char_tokenizer(ALPHABET)
    sampler = tiny_llama(len(tok))          # the initial policy, whole in every process
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=4, seed=0)
    batches = [env.sample(sampler, 8, 1.0, torch.device("cpu"),
                          torch.Generator().manual_seed(100 + i)) for i in range(ITERATIONS)]
    for strategy in (os.environ["STRATEGIES"].split(",") if torchrun else ["single"]):
        first = build(strategy, out / strategy)
        rank, world = first.world.rank, first.world.size
        run(first, batches, rank, world)
        assert first.last_iterate is not None
        last_iterate = whole(first.last_iterate)
        final = full_state(first)

        resumed = build(strategy, out / strategy)
        at = resumed.resume(out / strategy / "checkpoints" / f"iter-{RESUME_AT:07d}")
        count = resumed.average.count
        run(resumed, batches, rank, world)
        again = full_state(resumed)             # (gathering FSDP2's shards: every rank)
        if rank == 0:
            torch.save({"final": final, "resumed": again, "resumed_at": at,
                        "count_at_resume": count, "last_iterate": last_iterate,
                        "world_size": world}, out / f"{strategy}.pt")
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

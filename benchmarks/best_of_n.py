"""Best-of-n of the base SmolLM2-135M-Instruct on the held-out movie-review prompts.

    python benchmarks/best_of_n.py [--prompts 16] [--n 16]

Samples ``n`` responses per prompt (temperature 1.0, 48 new tokens, seed 1234), scores them with
VADER, and prints the mean score and share positive of the best of the first k samples for
k = 1, 2, 4, ..., n, with the KL bound of best-of-k, log k - (k - 1) / k nats: what the KL
budget of the sentiment task allows, to compare PPO's reward-for-KL against (README, Results).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from smollm2_samples import repeated_prompts_env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy, env = repeated_prompts_env("eval", args.prompts, args.n)
    gen = torch.Generator().manual_seed(1234)
    scores: list[float] = []
    t0 = time.perf_counter()
    total = args.prompts * args.n
    for start in range(0, total, args.batch_size):
        idx = list(range(start, min(start + args.batch_size, total)))
        ep = env.sample(policy, len(idx), 1.0, torch.device("cpu"), gen, indices=idx)
        scores += ep.scores.tolist()
    positive = sum(s > 0.05 for s in scores) / len(scores)
    print(f"{len(scores)} samples in {time.perf_counter() - t0:.0f} s; mean "
          f"{statistics.mean(scores):.3f}, positive {positive:.1%}")
    rows = [scores[i * args.n: (i + 1) * args.n] for i in range(args.prompts)]
    k = 1
    while k <= args.n:
        best = [max(r[:k]) for r in rows]
        print(f"best-of-{k:<3d} mean {statistics.mean(best):.3f}, positive "
              f"{sum(b > 0.05 for b in best) / len(best):.1%}, KL <= "
              f"{math.log(k) - (k - 1) / k:.2f} nats")
        k *= 2


if __name__ == "__main__":
    main()

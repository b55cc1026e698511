"""The PPO update phase with and without sparse embedding gradients, in one process.

    python benchmarks/update_ab.py --size tiny --reps 6

Builds ppolm's side of the vs_trl workload (separate critic by default), collects one rollout,
then times ``Trainer.update`` on it alternately with the sparse lookups on (ppolm's default)
and off (``nn.Embedding``'s dense backward), restoring the weights and optimizer state before
each timing so both variants do the same work. Prints seconds per update for each.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sides import PpolmSide  # noqa: E402
from workload import Work  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--shared", action="store_true", help="value head on the shared trunk")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    side = PpolmSide(Work(size=args.size, threads=args.threads), shared=args.shared)
    tr = side.trainer
    _, rollout = tr.collect()
    rollout = tr.compute_advantages(rollout)
    state = (copy.deepcopy(tr.policy.state_dict()), copy.deepcopy(tr.value_head.state_dict()),
             copy.deepcopy(tr.optimizer.state_dict()))
    embeddings = tr.lookups.embeddings
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    tr.update(rollout)                                   # warm-up (finds the buffers)
    buffers = tr.lookups._buffers
    for rep in range(args.reps):
        for name in (("sparse", "dense") if rep % 2 == 0 else ("dense", "sparse")):
            tr.policy.load_state_dict(state[0])
            tr.value_head.load_state_dict(state[1])
            tr.optimizer.load_state_dict(state[2])
            sparse = name == "sparse"
            tr.lookups.embeddings = embeddings if sparse else []
            tr.lookups._buffers = buffers if sparse else {}
            t0 = time.perf_counter()
            tr.update(rollout)
            times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        print(f"{name:6s} update: median {statistics.median(t):.3f} s  "
              f"(min {min(t):.3f}, all {' '.join(f'{x:.2f}' for x in t)})")
    ratio = statistics.median(times["dense"]) / statistics.median(times["sparse"])
    print(f"trained embedding tables: {len(embeddings)}; dense / sparse median: {ratio:.3f}")


if __name__ == "__main__":
    main()

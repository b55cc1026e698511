"""The PPO update phase with and without persistent gradient buffers, in one process.

    python benchmarks/update_ab.py --size tiny --reps 6

Builds ppolm's side of the vs_trl workload (separate critic by default), collects one rollout,
then times ``Trainer.update`` on it alternately with the gradient buffers (``ppolm.engines.fast_cpu.grad_buffers``:
ppolm's default) and without (PyTorch's default backward: fresh gradients every minibatch,
``nn.Embedding``'s dense backward), restoring the weights and optimizer state before each timing
so both variants do the same work. Prints seconds per update and page faults for each.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ppolm.engines.fast_cpu.grad_buffers import GradBuffers

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
    variants = {"buffers": tr.grad_buffers, "default": GradBuffers()}   # (the latter: none)
    times: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, list[int]] = {k: [] for k in variants}
    for rep in range(args.reps + 1):          # rep 0 warms both up (the buffers are found)
        for name in (("buffers", "default") if rep % 2 == 0 else ("default", "buffers")):
            tr.policy.load_state_dict(state[0])
            tr.value_head.load_state_dict(state[1])
            tr.optimizer.load_state_dict(state[2])
            tr.grad_buffers = variants[name]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            tr.update(rollout)
            if rep:
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    for name, t in times.items():
        print(f"{name:7s} update: median {statistics.median(t):.3f} s  "
              f"(min {min(t):.3f}, all {' '.join(f'{x:.2f}' for x in t)}), "
              f"page faults median {statistics.median(faults[name]):.0f}")
    ratio = statistics.median(times["default"]) / statistics.median(times["buffers"])
    print(f"weights with buffers: {len(variants['buffers'].weights)}; default / buffers median: "
          f"{ratio:.3f}")


if __name__ == "__main__":
    main()

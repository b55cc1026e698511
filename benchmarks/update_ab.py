"""The PPO update phase on the fast CPU engine and on the plain engine, in one process.

    python benchmarks/update_ab.py --size tiny --reps 6

Builds ppolm's side of the vs_trl workload (separate critic by default) twice, once per engine,
with the same weights; collects one rollout, then times ``Trainer.update`` on it alternately on
each engine, restoring the weights and optimizer state before each timing so both do the same
work. Prints seconds per update and page faults for each, and the ratio.
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
    sides = {e: PpolmSide(Work(size=args.size, threads=args.threads, engine=e),
                          shared=args.shared).trainer for e in ("fast_cpu", "plain")}
    fast, plain = sides["fast_cpu"], sides["plain"]
    plain.policy.load_state_dict(fast.policy.state_dict())
    plain.value_head.load_state_dict(fast.value_head.state_dict())
    _, rollout = fast.collect()
    advantages = fast.compute_advantages(rollout)
    state = {e: (copy.deepcopy(t.policy.state_dict()), copy.deepcopy(t.value_head.state_dict()),
                 copy.deepcopy(t.engine.state_dict())) for e, t in sides.items()}
    times: dict[str, list[float]] = {e: [] for e in sides}
    faults: dict[str, list[int]] = {e: [] for e in sides}
    for rep in range(args.reps + 1):          # rep 0 warms both up
        for name in (("fast_cpu", "plain") if rep % 2 == 0 else ("plain", "fast_cpu")):
            tr = sides[name]
            tr.policy.load_state_dict(state[name][0])
            tr.value_head.load_state_dict(state[name][1])
            tr.engine.load_state_dict(copy.deepcopy(state[name][2]))
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            tr.update(rollout, advantages)
            if rep:
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    for name, t in times.items():
        print(f"{name:8s} update: median {statistics.median(t):.3f} s  "
              f"(min {min(t):.3f}, all {' '.join(f'{x:.2f}' for x in t)}), "
              f"page faults median {statistics.median(faults[name]):.0f}")
    ratio = statistics.median(times["plain"]) / statistics.median(times["fast_cpu"])
    print(f"plain / fast_cpu median: {ratio:.3f}")


if __name__ == "__main__":
    main()

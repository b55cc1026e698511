"""PPO on several processes (torchrun, gloo on the CPU): memory per rank and step time.

    python benchmarks/distributed.py memory      # SmolLM2-135M architecture, separate critic
    python benchmarks/distributed.py speed       # the tiny vs_trl workload

``memory``: one PPO iteration of the SmolLM2-135M architecture (random weights, SmolLM2's
vocabulary, tied embeddings) with a separate critic and the frozen reference, in one process
(plain engine) and on 2 ranks with FSDP2 (and DDP). Each rank reports the bytes of ITS trained
parameters, their gradients (just before the optimizer step) and the AdamW state, counted from
the tensors (a sharded tensor's local shard), and its peak resident memory (ru_maxrss).

``speed``: seconds per PPO iteration (after one warm-up) of the tiny workload
(benchmarks/workload.py, toy reward, separate critic): 1 process x 2 threads (plain engine, and
the fast CPU engine for reference) against 2 ranks x 1 thread (DDP and FSDP2).

Results: printed, and written to benchmarks/results/distributed-<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from workload import Work, toy_policy_and_env  # noqa: E402


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of ``t`` (its shard when ``t`` is a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def build(work: Work, strategy: str, iterations: int) -> Any:
    from ppolm import PPOConfig, Trainer, ValueHead

    policy, env = toy_policy_and_env(work)
    config = PPOConfig(iterations=iterations, batch_size=work.batch_size,
                       minibatch_size=work.minibatch_size, ppo_epochs=work.ppo_epochs,
                       learning_rate=work.learning_rate, temperature=work.temperature,
                       kl_coef=work.kl_coef, vf_coef=work.vf_coef, max_grad_norm=None,
                       engine=work.engine, progress=False,
                       distributed="fsdp" if strategy == "fsdp" else "ddp")
    return Trainer(policy, env, config, value_head=ValueHead.separate(policy))


def worker_memory(out: Path, strategy: str) -> None:
    work = Work(size="135m", batch_size=4, response_len=16, ppo_epochs=1, num_minibatches=1,
                reward="toy", engine="plain", threads=1)
    trainer = build(work, strategy, iterations=1)
    engine, seen = trainer.engine, {}
    step = engine.step

    def measured_step(loss_finite: bool = True) -> Any:
        seen["params"] = sum(local_bytes(p) for p in engine.params)
        seen["grads"] = sum(local_bytes(p.grad) for p in engine.params if p.grad is not None)
        return step(loss_finite)

    engine.step = measured_step                                        # type: ignore[method-assign]
    trainer.train()
    seen["adamw_state"] = sum(local_bytes(v) for s in engine.optimizer.state.values()
                              for v in s.values() if torch.is_tensor(v))
    seen["trained_parameters"] = sum(p.numel() for p in trainer.policy.parameters()) + sum(
        p.numel() for p in trainer.value_head.parameters())
    seen["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = int(os.environ.get("RANK", "0"))
    (out / f"memory-{strategy}-{os.environ.get('WORLD_SIZE', '1')}-{rank}.json").write_text(
        json.dumps(seen))


def worker_speed(out: Path, engine: str, strategy: str, iterations: int) -> None:
    work = Work(size="tiny", reward="toy", engine=engine,
                threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.set_num_threads(work.threads)
    trainer = build(work, strategy, iterations)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        trainer.iterate()
        times.append(time.perf_counter() - t0)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / f"speed-{engine}-{strategy}-{os.environ.get('WORLD_SIZE', '1')}.json"
         ).write_text(json.dumps({"seconds": times[1:]}))


def launch(args: list[str], ranks: int, threads: int) -> None:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(ranks)] if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*cmd, __file__, *args], check=True, env=env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["memory", "speed", "_memory", "_speed"])
    p.add_argument("rest", nargs="*")
    p.add_argument("--iterations", type=int, default=6)
    a = p.parse_args()
    if a.mode == "_memory":
        return worker_memory(Path(a.rest[0]), a.rest[1])
    if a.mode == "_speed":
        return worker_speed(Path(a.rest[0]), a.rest[1], a.rest[2], int(a.rest[3]))
    out = Path(tempfile.mkdtemp(prefix="ppolm-dist-"))
    result: dict[str, Any] = {"mode": a.mode, "torch": torch.__version__}
    if a.mode == "memory":
        runs = [("plain", 1), ("fsdp", 2), ("ddp", 2)]
        for strategy, ranks in runs:
            launch(["_memory", str(out), strategy], ranks, threads=2 // ranks)
        for strategy, ranks in runs:
            rows = [json.loads((out / f"memory-{strategy}-{ranks}-{r}.json").read_text())
                    for r in range(ranks)]
            result[f"{strategy}-{ranks}"] = rows
        one = result["plain-1"][0]
        total = one["params"] + one["grads"] + one["adamw_state"]
        print(f"SmolLM2-135M architecture + separate critic: {one['trained_parameters']:,} "
              "trained parameters")
        print(f"{'run':<14}{'rank':>5}{'params MiB':>12}{'grads MiB':>11}{'AdamW MiB':>11}"
              f"{'sum / 1 rank':>14}{'peak RSS MiB':>14}")
        for key in ("plain-1", "fsdp-2", "ddp-2"):
            for r, row in enumerate(result[key]):
                mine = row["params"] + row["grads"] + row["adamw_state"]
                print(f"{key:<14}{r:>5}{row['params'] / 2**20:>12.1f}{row['grads'] / 2**20:>11.1f}"
                      f"{row['adamw_state'] / 2**20:>11.1f}{mine / total:>14.2f}"
                      f"{row['peak_rss_mib']:>14.0f}")
    else:
        runs = [("fast_cpu", "ddp", 1, 2), ("plain", "ddp", 1, 2), ("plain", "ddp", 2, 1),
                ("plain", "fsdp", 2, 1)]
        for engine, strategy, ranks, threads in runs:
            launch(["_speed", str(out), engine, strategy, str(a.iterations)], ranks, threads)
        base = None
        for engine, strategy, ranks, _threads in runs:
            s = json.loads((out / f"speed-{engine}-{strategy}-{ranks}.json").read_text())
            med = statistics.median(s["seconds"])
            key = f"{engine}" + (f" {strategy} {ranks} ranks x 1 thread" if ranks > 1
                                 else " 1 process x 2 threads")
            result[key] = {"seconds": s["seconds"], "median": med}
            if engine == "plain" and ranks == 1:
                base = med
        print("seconds per PPO iteration, tiny workload (median of "
              f"{a.iterations - 1} after one warm-up)")
        for key, row in result.items():
            if isinstance(row, dict):
                ratio = f"  ({row['median'] / base:.2f}x plain 1 process)" if base else ""
                print(f"  {key:<42}{row['median']:>8.2f}{ratio}")
    file = HERE / "results" / f"distributed-{a.mode}.json"
    file.write_text(json.dumps(result, indent=1))
    print(f"written: {file}")


if __name__ == "__main__":
    main()

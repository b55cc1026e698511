"""ppolm against TRL's PPO on identical work, side by side, in one run.

    python benchmarks/vs_trl.py            # tiny and SmolLM2-135M sizes, learning check, scaling
    python benchmarks/vs_trl.py --quick    # tiny size, speed only (under 3 minutes)
    python benchmarks/vs_trl.py --device cuda --sizes 135m --bf16   # on a GPU
    python benchmarks/vs_trl.py --quick --bf16   # both sides bf16 autocast on a CPU with AMX
    python benchmarks/vs_trl.py --quick --compile   # ppolm with PPOConfig.compile
    python benchmarks/vs_trl.py --quick --engine plain   # ppolm's plain engine

Each side runs in its own worker process; the parent alternates them one PPO iteration at a
time (the side that goes first alternates too), so a change in machine load hits both alike.
Prints, per side: episodes/s, seconds per phase, peak memory, achieved FLOP/s of useful work
against a matmul rate calibrated in the same run; last a line ``ratio=X.XX`` (ppolm with a
separate critic, episodes/s, over TRL). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import Work, calibrate_matmul, useful_flops  # noqa: E402

SIDE_NAMES = {"separate": "ppolm (separate critic)", "shared": "ppolm (default: shared trunk)",
              "trl": "TRL 0.29.1"}


class Worker:
    """A side in its own process (spawned, so each has a fresh torch and allocator)."""

    def __init__(self, ctx: Any, side: str, work: Work) -> None:
        import sides

        self.side = side
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=sides.worker, args=(child, side, work.to_dict()),
                                daemon=True)
        self.proc.start()
        self.info: dict[str, Any] = {}

    def ready(self) -> dict[str, Any]:
        self.info = self._recv()
        return self.info

    def step(self) -> dict[str, Any]:
        self.conn.send("step")
        return self._recv()

    def _recv(self) -> dict[str, Any]:
        msg = self.conn.recv()
        if not msg.get("ok"):
            print(msg.get("traceback", ""), file=sys.stderr)
            raise SystemExit(f"{self.side} worker failed: {msg.get('error')}")
        return msg

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


def run_alternating(work: Work, sides: list[str], warmup: int, iters: int,
                    log: Any = print) -> dict[str, dict[str, Any]]:
    """Build ``sides`` (in parallel), then warm up and measure them alternately."""
    ctx = mp.get_context("spawn")
    workers = {s: Worker(ctx, s, work) for s in sides}
    try:
        for w in workers.values():
            w.ready()
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for i in range(warmup + iters):
            order = sides if i % 2 == 0 else sides[::-1]
            for s in order:
                r = workers[s].step()
                if i >= warmup:
                    results[s].append(r)
                label = f"warmup {i + 1}" if i < warmup else f"iter {i + 1 - warmup}"
                log(f"  [{work.size}] {label:9s} {s:8s} {r['total']:7.2f} s  "
                    f"score {r['score']:+.3f}")
        return {s: {"iters": results[s], **workers[s].info} for s in sides}
    finally:
        for w in workers.values():
            w.stop()


def summarise(work: Work, side: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    rows = side["iters"]
    total = sum(r["total"] for r in rows)
    n = side["n_params"]
    flops = useful_flops(work, n["policy"], n["value"], n["reward"])
    per_iter = total / len(rows)
    out = {
        "episodes_per_s": work.batch_size * len(rows) / total,
        "s_per_iter": per_iter,
        "s_per_iter_median": statistics.median(r["total"] for r in rows),
        "phases": {p: sum(r[p] for r in rows) / len(rows)
                   for p in ("generate", "forward", "reward", "train")},
        "peak_mib": max(r["peak_mib"] for r in rows),
        "baseline_mib": side["baseline_mib"],
        "useful_gflop_per_iter": sum(flops.values()) / 1e9,
        "gflops": sum(flops.values()) / per_iter / 1e9,
        "train_gflops": flops["train"] / max(
            sum(r["train"] for r in rows) / len(rows), 1e-9) / 1e9,
    }
    out["pct_of_peak"] = 100 * out["gflops"] * 1e9 / peak_flops
    return out


def print_table(work: Work, summary: dict[str, dict[str, Any]], peak: float, device: str) -> None:
    mem = "peak GPU MiB" if device.startswith("cuda") else "peak RSS MiB (above imports)"
    print(f"\n== {work.size}: batch {work.batch_size}, prompt {work.prompt_len} + response "
          f"{work.response_len} tokens, {work.ppo_epochs} epochs x {work.num_minibatches} "
          f"minibatches; matmul peak {peak / 1e9:.1f} GFLOP/s ==")
    print(f"{'side':32s} {'eps/s':>7s} {'s/iter':>7s} {'generate':>8s} {'fwd':>6s} "
          f"{'reward':>6s} {'train':>6s} {'GFLOP/s':>8s} {'% peak':>6s}  {mem}")
    for s, r in summary.items():
        ph = r["phases"]
        if device.startswith("cuda"):
            m = f"{r['peak_mib']:.0f}"
        else:
            m = f"{r['peak_mib']:.0f} ({r['peak_mib'] - r['baseline_mib']:.0f})"
        print(f"{SIDE_NAMES[s]:32s} {r['episodes_per_s']:7.2f} {r['s_per_iter']:7.2f} "
              f"{ph['generate']:8.2f} {ph['forward']:6.2f} {ph['reward']:6.2f} {ph['train']:6.2f} "
              f"{r['gflops']:8.1f} {r['pct_of_peak']:6.1f}  {m}")


def speed(args: argparse.Namespace, size: str, peak: float) -> dict[str, Any]:
    work = Work(size=size, device=args.device, bf16=args.bf16, threads=args.threads,
                batch_size=args.batch_size, response_len=args.response_len, seed=args.seed,
                compile=args.compile, compile_trl=args.compile_trl, engine=args.engine)
    # --quick: the headline pair only (ppolm's default config is measured in a full run).
    sides = ["separate", "trl"] + ([] if args.no_shared or args.quick else ["shared"])
    warmup, iters = (1, 2) if args.quick else (args.warmup, args.iters)
    if size == "135m" and not args.device.startswith("cuda") and not args.iters_given:
        iters = 2
    print(f"\n[{size}] building {', '.join(sides)}; {warmup} warm-up + {iters} measured "
          "iterations each, alternating")
    raw = run_alternating(work, sides, warmup, iters)
    for s in sides:
        print(f"  {SIDE_NAMES[s]}: {raw[s]['notes']}")
    summary = {s: summarise(work, raw[s], peak) for s in sides}
    print_table(work, summary, peak, args.device)
    ratio = summary["separate"]["episodes_per_s"] / summary["trl"]["episodes_per_s"]
    out: dict[str, Any] = {"work": work.to_dict(), "summary": summary, "raw": raw,
                           "ratio": ratio}
    if "shared" in summary:
        out["ratio_shared"] = summary["shared"]["episodes_per_s"] / summary["trl"]["episodes_per_s"]
        print(f"[{size}] ppolm default (shared trunk) / TRL: {out['ratio_shared']:.2f}x")
    mem_ratio = summary["separate"]["peak_mib"] / summary["trl"]["peak_mib"]
    print(f"[{size}] ppolm (separate critic) / TRL: {ratio:.2f}x episodes/s, "
          f"{mem_ratio:.2f}x peak memory")
    return out


def learning(args: argparse.Namespace) -> dict[str, Any]:
    """Both sides on the toy reward (workload.ToyReward) from the same weights and settings:
    both must learn, and their final scores must agree within noise."""
    seeds = ([int(x) for x in args.learn_seeds.split(",")] if args.learn_seeds else
             [0] if args.quick else [0, 1, 2])
    iters = args.learn_iters or (6 if args.quick else 20)
    curves: dict[str, list[list[float]]] = {"separate": [], "trl": []}
    print(f"\n[learning] toy reward, tiny size, response 16 tokens, lr {args.learn_lr:g}; "
          f"{len(seeds)} seed(s) x {iters} iterations per side")
    for seed in seeds:
        work = Work(size="tiny", reward="toy", response_len=16, learning_rate=args.learn_lr,
                    device=args.device, bf16=args.bf16, threads=args.threads, seed=seed,
                    compile=args.compile, compile_trl=args.compile_trl, engine=args.engine)
        raw = run_alternating(work, ["separate", "trl"], 0, iters, log=lambda *_: None)
        for s in curves:
            curves[s].append([r["score"] for r in raw[s]["iters"]])
    k = max(iters // 4, 2)
    # Noise: the spread of one run's late scores (per-iteration standard deviation over the
    # last k iterations, pooled over sides and seeds), as a standard error of a mean of k * seeds.
    sds = [statistics.stdev(c[-k:]) for runs in curves.values() for c in runs]
    noise = statistics.mean(sds) / (k * len(seeds)) ** 0.5
    stats = {}
    for s, runs in curves.items():
        first = statistics.mean(statistics.mean(c[:2]) for c in runs)
        last = statistics.mean(statistics.mean(c[-k:]) for c in runs)
        stats[s] = {"first": first, "last": last, "gain": last - first,
                    "mean_curve": [statistics.mean(v) for v in zip(*runs, strict=True)]}
        print(f"  {SIDE_NAMES[s]:26s} score {first:+.3f} -> {last:+.3f} (first 2 and last {k} "
              f"iterations): " + " ".join(f"{v:+.2f}" for v in stats[s]["mean_curve"]))
    diff = stats["separate"]["last"] - stats["trl"]["last"]
    learned = all(v["gain"] > 2 * noise for v in stats.values())
    same = abs(diff) <= 3 * 2 ** 0.5 * noise
    print(f"  both learn (gain > 2 s.e. = {2 * noise:.3f}): {learned}; final scores differ by "
          f"{diff:+.3f}, within 3 s.e. of a difference ({3 * 2 ** 0.5 * noise:.3f}): {same}")
    return {"curves": curves, "seeds": seeds, "iters": iters, "stats": stats, "noise": noise,
            "diff": diff, "learned": learned, "same": same, "pass": learned and same}


def scaling(args: argparse.Namespace, peak: float) -> list[dict[str, Any]]:
    """ppolm's seconds per iteration as the response length and the batch grow."""
    grid = [(16, t) for t in (32, 64, 128, 256)] + [(b, 32) for b in (8, 32, 64)]
    rows = []
    print("\n[scaling] ppolm (separate critic), tiny size; 1 warm-up + 2 measured iterations")
    for b, t in grid:
        work = Work(size="tiny", batch_size=b, response_len=t, device=args.device,
                    bf16=args.bf16, threads=args.threads, seed=args.seed, compile=args.compile,
                    engine=args.engine)
        raw = run_alternating(work, ["separate"], 1, 2, log=lambda *_: None)
        s = summarise(work, raw["separate"], peak)
        tokens = b * (work.prompt_len + t)
        rows.append({"batch": b, "response_len": t, "tokens": tokens,
                     "s_per_iter": s["s_per_iter"], "us_per_token": 1e6 * s["s_per_iter"] / tokens,
                     "gflops": s["gflops"], "peak_mib": s["peak_mib"]})
        print(f"  batch {b:3d} response {t:4d}: {s['s_per_iter']:7.2f} s/iter, "
              f"{rows[-1]['us_per_token']:6.0f} us/token, {s['gflops']:6.1f} GFLOP/s")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny size, speed only, 1 warm-up + 2 measured iterations (< 3 min); "
                        "--parts speed,learning adds a 1-seed, 6-iteration learning smoke check "
                        "(too short to be conclusive: the full run's check is 3 seeds x 20)")
    p.add_argument("--sizes", default=None, help="comma-separated: tiny,135m")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--engine", default="auto", choices=("auto", "plain", "fast_cpu"),
                   help="ppolm's engine (auto: fast_cpu on CPU, plain on CUDA)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (on CPU: "
                   "ppolm's cpu_bf16, TRL's accelerate mixed precision; needs a CPU with bf16 "
                   "units)")
    p.add_argument("--compile", action="store_true", help="ppolm's side with torch.compile "
                   "(PPOConfig.compile; compiled in the warm-up iteration, timed there)")
    p.add_argument("--compile-trl", action="store_true", help="TRL's side with torch.compile "
                   "(accelerate's dynamo backend, inductor)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="measured iterations per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shared", action="store_true", help="skip ppolm's default config")
    p.add_argument("--parts", default=None, help="comma-separated parts to run: speed, learning, "
                   "scaling (default: all; --quick: speed)")
    p.add_argument("--no-learning", action="store_true")
    p.add_argument("--learn-iters", type=int, default=None)
    p.add_argument("--learn-lr", type=float, default=1e-3)
    p.add_argument("--learn-seeds", default=None,
                   help="comma-separated seeds of the learning check (default 0,1,2)")
    p.add_argument("--scaling", action="store_true", help="also the scaling table (default "
                   "in a full run)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--json", default=None, help="write every figure to this file")
    args = p.parse_args()
    args.iters_given = args.iters is not None
    args.iters = args.iters or 4
    sizes = (args.sizes or ("tiny" if args.quick else "tiny,135m")).split(",")
    parts = set((args.parts or ("speed" if args.quick else
                                "speed,learning,scaling")).split(","))
    if args.no_learning:
        parts.discard("learning")
    if args.no_scaling:
        parts.discard("scaling")
    if args.scaling:
        parts.add("scaling")
    t_start = time.perf_counter()

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load average before the run {load:.2f}")
    peak = calibrate_matmul(args.device, args.threads, bf16=args.bf16)
    kind = ("bf16 8192^2" if args.device.startswith("cuda")
            else "bf16 2048^2" if args.bf16 else "float32 2048^2")
    print(f"calibrated matmul peak: {peak / 1e9:.1f} GFLOP/s ({kind})")
    report: dict[str, Any] = {"peak_flops": peak, "device": args.device, "threads": args.threads,
                              "load_before": load, "sizes": {}}
    if "speed" in parts:
        for size in sizes:
            report["sizes"][size] = speed(args, size, peak)
    if "learning" in parts:
        report["learning"] = learning(args)
    if "scaling" in parts:
        report["scaling"] = scaling(args, peak)
    report["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report["wall_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    print(f"\nwall time {report['wall_s']:.0f} s; load average after the run "
          f"{report['load_after']:.2f}")
    if "learning" in report:
        print(f"learning check: {'PASS' if report['learning']['pass'] else 'FAIL'}")
    if report["sizes"]:
        print(f"ratio={report['sizes'][sizes[0]]['ratio']:.2f}")


if __name__ == "__main__":
    main()

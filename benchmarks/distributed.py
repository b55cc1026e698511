"""PPO on several processes (torchrun, gloo on the CPU): memory per rank and step time.

    python benchmarks/distributed.py memory      # SmolLM2-135M and -360M architectures
    python benchmarks/distributed.py memory --sizes 135m
    python benchmarks/distributed.py speed       # the tiny vs_trl workload
    python benchmarks/distributed.py equality --sizes 360m   # FSDP2 meta-built == 1 process

``memory``: one PPO iteration of the SmolLM2-135M and SmolLM2-360M architectures (random
weights saved once as safetensors under the benchmark cache, SmolLM2's vocabulary, tied
embeddings) with a separate critic and the frozen reference, in one process (plain engine,
``HFPolicy(folder)``) and on 2 ranks with FSDP2 (the models built on the meta device with
``empty_policy(folder)``, each rank reading its shards) and DDP (``HFPolicy(folder)`` on every
rank; 135M only by default: 360M needs twice one process's memory). Each rank reports the bytes
of ITS trained parameters, their gradients (just before the optimizer step) and the AdamW
state, counted from the tensors (a sharded tensor's local shard), its peak resident memory
(ru_maxrss) once the Trainer is built, and at the end of the iteration.

``equality``: one PPO update of the architecture (separate critic) from the same 4 episodes
in one process and on 2 ranks with FSDP2 on models built on the meta device; the largest
difference of the trained weights.

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


def random_model(size: str) -> Path:
    """The folder of the SmolLM2 architecture ``size`` with random weights (seed 0), written
    once with save_pretrained (safetensors) under the benchmark cache."""
    from workload import CACHE, llama_config, smollm2_tokenizer

    folder = CACHE / f"random-smollm2-{size}"
    if not (folder / "config.json").is_file():
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        LlamaForCausalLM(llama_config(smollm2_tokenizer(), size)).save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_memory(out: Path, strategy: str, size: str) -> None:
    from workload import make_prompts, smollm2_tokenizer

    from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, ValueHead
    from ppolm.policies.pretrained import empty_policy

    folder = random_model(size)
    tok = smollm2_tokenizer()
    # a reward that holds no model: what is measured is the policy, critic and reference
    env = TextGenerationEnv(make_prompts(tok, 8, 10), tok,
                            CallableReward(lambda ps, rs: [len(r) / 100 for r in rs]),
                            max_new_tokens=16, ignore_eos=True, seed=0)
    policy = empty_policy(folder) if strategy == "fsdp" else HFPolicy(folder)
    config = PPOConfig(iterations=1, batch_size=4, minibatch_size=4, ppo_epochs=1,
                       learning_rate=1e-6, max_grad_norm=None, engine="plain", progress=False,
                       distributed="fsdp" if strategy == "fsdp" else "ddp")
    trainer = Trainer(policy, env, config, value_head=ValueHead.separate(policy))
    engine, seen = trainer.engine, {"built_rss_mib": peak_rss_mib()}
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
    seen["peak_rss_mib"] = peak_rss_mib()
    rank = int(os.environ.get("RANK", "0"))
    (out / f"memory-{size}-{strategy}-{os.environ.get('WORLD_SIZE', '1')}-{rank}.json"
     ).write_text(json.dumps(seen))


def worker_equality(out: Path, strategy: str, size: str) -> None:
    """One PPO update of the architecture ``size`` (separate critic) from the same 4 episodes:
    in one process (HFPolicy of the folder; it samples the episodes and writes them and the
    trained weights), or on 2 ranks with FSDP2 on models built on the meta device (each rank
    takes 2 episodes; rank 0 writes the largest difference from one process's weights)."""
    from dataclasses import fields, replace

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from workload import make_prompts, smollm2_tokenizer

    from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, ValueHead
    from ppolm.engines.base import trained_modules
    from ppolm.policies.pretrained import empty_policy

    tok = smollm2_tokenizer()
    env = TextGenerationEnv(make_prompts(tok, 4, 10), tok,
                            CallableReward(lambda ps, rs: [len(r) / 100 for r in rs]),
                            max_new_tokens=8, ignore_eos=True, seed=0)
    folder = random_model(size)
    policy = empty_policy(folder) if strategy == "fsdp" else HFPolicy(folder)
    if strategy != "fsdp":
        episodes = env.sample(policy, 4, 1.0, torch.device("cpu"),
                              torch.Generator().manual_seed(1))
        torch.save(episodes, out / f"episodes-{size}.pt")
    episodes = torch.load(out / f"episodes-{size}.pt", weights_only=False)  # (written here)
    torch.manual_seed(0)                    # the same value head's linear map on both sides
    config = PPOConfig(iterations=1, batch_size=4, minibatch_size=4, ppo_epochs=1,
                       learning_rate=1e-4, rollout_logprobs="forward", engine="plain",
                       progress=False, kl_coef=0.1, distributed="fsdp")
    trainer = Trainer(policy, env, config, value_head=ValueHead.separate(policy))
    rank, world = trainer.world.rank, trainer.world.size
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    trainer.iterate(episodes=replace(episodes, **{
        f.name: getattr(episodes, f.name)[mine] for f in fields(episodes)
        if isinstance(getattr(episodes, f.name), (list, torch.Tensor))}))
    trained = trained_modules(trainer.policy, trainer.value_head)
    if strategy != "fsdp":
        torch.save({k: v.detach() for k, v in trained.state_dict().items()},
                   out / f"weights-{size}.pt")
        return
    whole = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    if rank == 0:
        one = torch.load(out / f"weights-{size}.pt", weights_only=True)
        start = HFPolicy(folder).state_dict()
        diff = max(float((whole[k] - one[k]).abs().max()) for k in one)
        moved = max(float((one[f"policy.{k}"] - v).abs().max()) for k, v in start.items())
        (out / f"equality-{size}.json").write_text(json.dumps(
            {"max_abs_difference": diff, "largest_move": moved}))


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


def launch(args: list[str], ranks: int, threads: int, **env_vars: str) -> None:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(ranks)] if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env_vars}
    subprocess.run([*cmd, __file__, *args], check=True, env=env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["memory", "speed", "equality", "_memory", "_speed",
                                    "_equality"])
    p.add_argument("rest", nargs="*")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--sizes", default="135m,360m", help="memory: the architectures")
    p.add_argument("--ddp-sizes", default="135m", help="memory: those also run with DDP")
    p.add_argument("--mmap-threshold", type=int, default=1 << 20,
                   help="memory: glibc's MALLOC_MMAP_THRESHOLD_ for every process (tensors "
                   "at least this big get their own mapping, given back when freed, so that the "
                   "peak counts what is held rather than what the heap kept); 0: glibc's default")
    a = p.parse_args()
    if a.mode == "_memory":
        return worker_memory(Path(a.rest[0]), a.rest[1], a.rest[2])
    if a.mode == "_equality":
        return worker_equality(Path(a.rest[0]), a.rest[1], a.rest[2])
    if a.mode == "_speed":
        return worker_speed(Path(a.rest[0]), a.rest[1], a.rest[2], int(a.rest[3]))
    out = Path(tempfile.mkdtemp(prefix="ppolm-dist-"))
    result: dict[str, Any] = {"mode": a.mode, "torch": torch.__version__}
    if a.mode == "memory":
        result["malloc_mmap_threshold"] = a.mmap_threshold or "glibc default"
    if a.mode == "equality":
        for size in a.sizes.split(","):
            subprocess.run([sys.executable, "-c", "import distributed as d; "
                            f"d.random_model({size!r})"], check=True, cwd=HERE)
            launch(["_equality", str(out), "plain", size], 1, threads=2)
            launch(["_equality", str(out), "fsdp", size], 2, threads=1)
            result[size] = json.loads((out / f"equality-{size}.json").read_text())
            print(f"SmolLM2-{size.upper()} architecture, one update, FSDP2 on meta-built models "
                  f"(2 ranks) vs one process: largest difference "
                  f"{result[size]['max_abs_difference']:.2e} (the update moved weights by up "
                  f"to {result[size]['largest_move']:.2e})")
    elif a.mode == "memory":
        for size in a.sizes.split(","):
            subprocess.run([sys.executable, "-c", "import distributed as d; "
                            f"d.random_model({size!r})"], check=True, cwd=HERE)
            runs = [("plain", 1), ("fsdp", 2)] + (
                [("ddp", 2)] if size in a.ddp_sizes.split(",") else [])
            malloc = ({"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)} if a.mmap_threshold
                      else {})
            for strategy, ranks in runs:      # one at a time: each alone in memory
                launch(["_memory", str(out), strategy, size], ranks, threads=2 // ranks,
                       **malloc)
            for strategy, ranks in runs:
                result[f"{size}-{strategy}-{ranks}"] = [json.loads(
                    (out / f"memory-{size}-{strategy}-{ranks}-{r}.json").read_text())
                    for r in range(ranks)]
            print_memory(result, size, [f"{size}-{s}-{n}" for s, n in runs])
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


def print_memory(result: dict[str, Any], size: str, keys: list[str]) -> None:
    one = result[keys[0]][0]
    total = one["params"] + one["grads"] + one["adamw_state"]
    print(f"SmolLM2-{size.upper()} architecture + separate critic: "
          f"{one['trained_parameters']:,} trained parameters")
    print(f"{'run':<14}{'rank':>5}{'params MiB':>12}{'grads MiB':>11}{'AdamW MiB':>11}"
          f"{'sum / 1 rank':>14}{'built RSS':>11}{'peak RSS MiB':>14}{'/ 1 process':>13}")
    for key in keys:
        for r, row in enumerate(result[key]):
            mine = row["params"] + row["grads"] + row["adamw_state"]
            print(f"{key:<14}{r:>5}{row['params'] / 2**20:>12.1f}{row['grads'] / 2**20:>11.1f}"
                  f"{row['adamw_state'] / 2**20:>11.1f}{mine / total:>14.2f}"
                  f"{row['built_rss_mib']:>11.0f}{row['peak_rss_mib']:>14.0f}"
                  f"{row['peak_rss_mib'] / one['peak_rss_mib']:>13.2f}")


if __name__ == "__main__":
    main()

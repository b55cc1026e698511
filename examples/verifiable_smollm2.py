"""A verifiable reward on SmolLM2-135M-Instruct: additions of two integers in [1, 12], the
answer checked by a rule (``ppolm.rollout.tasks.ArithmeticReward``), with PPO or a
critic-free estimator.

The base model answers 14% of the 64 held-out questions (temperature 1.0, seed 1234). The script
evaluates the success rate on held-out questions before and after training and writes it
with the wall time and peak memory, so estimators can be compared at equal episodes:

    python examples/verifiable_smollm2.py --estimator grpo
    python examples/verifiable_smollm2.py --estimator gae          # PPO with a value head
    python examples/verifiable_smollm2.py --recipe dapo             # a named recipe's settings

All six at 960 episodes, with the table: ``bash benchmarks/estimators_smollm2.sh``
(docs/experiments.md, run V0). A 2-minute smoke run:
    python examples/verifiable_smollm2.py --estimator rloo --iterations 2 --eval-prompts 8
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from ppolm import PPOConfig, TextGenerationEnv, Trainer, ValueHead, evaluate
from ppolm.config.recipes import RECIPES
from ppolm.policies.pretrained import chat_prompts, freeze_lower_layers, load_smollm2
from ppolm.rollout.tasks import ArithmeticReward, arithmetic_prompts

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimator", choices=ESTIMATORS, default="grpo")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="train with a named recipe's settings (its estimator, clipping, KL, "
                        "aggregation; the sizes and learning rate below) instead of --estimator")
    p.add_argument("--overlong-buffer", type=int, default=None,
                   help="DAPO's soft overlong punishment over the last N tokens of the budget")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="episodes per iteration")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--trainable-layers", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default runs/verifiable_smollm2/ESTIMATOR")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name = args.recipe or args.estimator
    out = Path(args.out or f"runs/verifiable_smollm2/{name}")
    out.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = load_smollm2()
    reference = load_smollm2()[0].requires_grad_(False)
    freeze_lower_layers(policy, args.trainable_layers)
    reward = ArithmeticReward()
    held_out = chat_prompts(tokenizer, arithmetic_prompts("eval", args.eval_prompts))
    env = TextGenerationEnv(chat_prompts(tokenizer, arithmetic_prompts("train")), tokenizer,
                            reward, max_new_tokens=args.max_new_tokens,
                            add_special_tokens=False, seed=args.seed,
                            overlong_buffer=args.overlong_buffer)
    gae = args.estimator == "gae" and args.recipe is None
    sizes = dict(iterations=args.iterations, batch_size=args.batch_size, minibatch_size=8,
                 ppo_epochs=1, learning_rate=args.learning_rate, warmup_steps=4,
                 seed=args.seed, device="cpu", keep_freed_memory=True,
                 output_dir=str(out / "run"), overwrite=True)
    if args.recipe:          # the recipe's objective, this script's sizes
        config = PPOConfig.recipe(args.recipe, samples_per_prompt=args.samples_per_prompt,
                                  **sizes)
    else:
        # GRPO's KL (k3 in the loss) for the group estimators; REINFORCE++ and PPO keep it
        # in the reward.
        kl = ({"kl_mode": "loss", "kl_estimator": "k3"}
              if args.estimator in ("grpo", "dr_grpo", "rloo") else {})
        config = PPOConfig(samples_per_prompt=1 if gae else args.samples_per_prompt,
                           advantage_estimator=args.estimator, kl_coef=args.kl_coef,
                           **kl, **sizes)
    value_head = ValueHead(policy.hidden_size, detach=True) if gae else None
    trainer = Trainer(policy, env, config, value_head=value_head, reference=reference)

    def success(name: str) -> dict:
        result = evaluate(policy, tokenizer, held_out, reward, reference,
                          max_new_tokens=args.max_new_tokens, add_special_tokens=False,
                          seed=1234, engine=trainer.engine, out=out / f"eval_{name}.json")
        print(f"{name}: success {result.reward_mean:.1%} ± {result.reward_se:.1%}, KL "
              f"{result.kl:.2f} ({result.n} held-out questions)")
        return {k: v for k, v in result.to_dict().items() if k != "samples"}

    before = success("before")
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    after = success("after")
    sampled = [r.get("sampled_per_trained", 1.0) for r in history]
    summary = {
        "estimator": name, "episodes": args.iterations * args.batch_size,
        "sampled_per_trained": sum(sampled) / len(sampled),
        "train_seconds": seconds,
        "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "before": before, "after": after, "args": vars(args),
        "config": config.to_sections(), "history": history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"| {name} | {before['reward_mean']:.1%} | {after['reward_mean']:.1%} | "
          f"{after['kl']:.2f} | {seconds / 60:.1f} min | {summary['peak_memory_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()

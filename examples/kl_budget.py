"""Fit a KL budget to a policy trained by examples/sentiment_smollm2.py, after the fact.

Loads the policy of a checkpoint, moves its weights toward SmolLM2's until the KL on training
prompts is at most the budget (``ppolm.kl_budget.fit_kl_budget``, the same step and settings as
the training script's ``--kl-budget``), then evaluates it on the held-out prompts.

    python examples/kl_budget.py runs/sentiment_smollm2/checkpoints/iter-0000048 --budget 5
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ppolm import SentimentReward, evaluate
from ppolm.kl_budget import fit_kl_budget
from ppolm.models import chat_prompts, freeze_lower_layers, load_smollm2
from ppolm.tasks import movie_review_prompts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (iter-NNNNNNN) of the training script")
    p.add_argument("--budget", type=float, default=5.0, help="nats per response")
    p.add_argument("--calibration-prompts", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--trainable-layers", type=int, default=10,
                   help="as in training (the frozen layers are shared with the reference)")
    p.add_argument("--out", default=None, help="write the fit and the evaluation here (JSON)")
    args = p.parse_args(argv)
    policy_dir = Path(args.checkpoint) / "policy"
    if not policy_dir.is_dir():
        p.error(f"{policy_dir} not found: pass a checkpoint folder of the training script")
    torch.set_num_threads(2)
    policy, tokenizer = load_smollm2()
    reference = load_smollm2()[0].requires_grad_(False)
    policy.load(policy_dir)
    freeze_lower_layers(policy, args.trainable_layers)
    reward = SentimentReward()
    settings = dict(max_new_tokens=48, temperature=1.0, add_special_tokens=False)
    calibration = chat_prompts(tokenizer, movie_review_prompts("train"))[
        -args.calibration_prompts:]
    fit = fit_kl_budget(policy, reference, tokenizer, calibration, reward, args.budget,
                        seed=4321, **settings)
    for t in fit.tries:
        print(f"alpha {t['alpha']:.3f}: KL {t['kl']:.2f}, reward {t['reward_mean']:.3f} "
              f"on {len(calibration)} training prompts")
    held_out = chat_prompts(tokenizer, movie_review_prompts("eval")[: args.eval_prompts])
    result = evaluate(policy, tokenizer, held_out, reward, reference=reference, seed=1234,
                      **settings)
    print(f"held-out at alpha {fit.alpha:.3f}: reward {result.reward_mean:.3f}, positive "
          f"{result.positive_share:.1%}, KL {result.kl:.2f}, distinct-2 {result.distinct_2:.3f}")
    summary = {"checkpoint": str(args.checkpoint), "fit": asdict(fit),
               "held_out": {k: v for k, v in result.to_dict().items() if k != "samples"}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()

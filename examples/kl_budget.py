"""Fit a KL budget to a policy trained by examples/sentiment_smollm2.py, after the fact.

Loads the policy of a checkpoint, moves its weights toward SmolLM2's until the KL on training
prompts is at most the budget (``ppolm.evaluation.kl_budget.fit_kl_budget``, the same step and
settings as the training script's ``--kl-budget``), then evaluates it on the held-out prompts.

    python examples/kl_budget.py runs/sentiment_smollm2/checkpoints/iter-0000048 --budget 5

or only evaluates the held-out prompts at given points of the line (no fit):

    python examples/kl_budget.py runs/F0/checkpoints/iter-0000048 --alphas 1,1.2 --eval-samples 4
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ppolm import SentimentReward, evaluate
from ppolm.evaluation.kl_budget import WeightPath, fit_kl_budget
from ppolm.policies.pretrained import chat_prompts, freeze_lower_layers, load_smollm2
from ppolm.rollout.tasks import movie_review_prompts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (iter-NNNNNNN) of the training script")
    p.add_argument("--budget", type=float, default=5.0, help="nats per response")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="band [budget - tolerance, budget] (0: at most the budget)")
    p.add_argument("--max-alpha", type=float, default=1.0,
                   help="> 1 lets the fit go past the trained weights (needs --tolerance > 0)")
    p.add_argument("--calibration-prompts", type=int, default=64)
    p.add_argument("--calibration-samples", type=int, default=1,
                   help="responses per calibration prompt")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=1, help="responses per held-out prompt")
    p.add_argument("--trainable-layers", type=int, default=10,
                   help="as in training (the frozen layers are shared with the reference)")
    p.add_argument("--alphas", default=None,
                   help="no fit: only evaluate the held-out prompts at these points of the "
                        "line, comma-separated (e.g. 1,1.2,1.35)")
    p.add_argument("--out", default=None, help="write the fit and the evaluation here (JSON)")
    args = p.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else None
    except ValueError:
        p.error(f"--alphas {args.alphas!r}: give numbers separated by commas, e.g. 1,1.2")
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
    held_out = chat_prompts(tokenizer, movie_review_prompts("eval")[: args.eval_prompts])
    if alphas is not None:
        line = along_the_line(policy, reference, tokenizer, held_out, reward, alphas,
                              args.eval_samples, settings)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(line, indent=1) + "\n")
        return line
    calibration = chat_prompts(tokenizer, movie_review_prompts("train"))[
        -args.calibration_prompts:]
    fit = fit_kl_budget(policy, reference, tokenizer, calibration, reward, args.budget,
                        tolerance=args.tolerance, max_alpha=args.max_alpha, seed=4321,
                        samples_per_prompt=args.calibration_samples, **settings)
    for t in fit.tries:
        print(f"alpha {t['alpha']:.3f}: KL {t['kl']:.2f}, reward {t['reward_mean']:.3f} "
              f"on {len(calibration)} training prompts")
    result = evaluate(policy, tokenizer, held_out, reward, reference=reference, seed=1234,
                      samples_per_prompt=args.eval_samples, **settings)
    print(f"held-out at alpha {fit.alpha:.3f}: reward {result.reward_mean:.3f}, positive "
          f"{result.positive_share:.1%}, KL {result.kl:.2f}, distinct-2 {result.distinct_2:.3f}")
    summary = {"checkpoint": str(args.checkpoint), "fit": asdict(fit),
               "held_out": {k: v for k, v in result.to_dict().items() if k != "samples"}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def along_the_line(policy: Any, reference: Any, tokenizer: Any, prompts: list[str],
                   reward: Any, alphas: list[float], samples: int,
                   settings: dict[str, Any]) -> dict:
    """Evaluate the held-out prompts at each alpha of theta_ref + alpha (theta - theta_ref)."""
    path = WeightPath(policy, reference)
    rows = []
    for alpha in alphas:
        path.set(alpha)
        r = evaluate(policy, tokenizer, prompts, reward, reference=reference, seed=1234,
                     samples_per_prompt=samples, **settings)
        print(f"alpha {alpha:.3f}: reward {r.reward_mean:.3f} ± {r.reward_se:.3f}, positive "
              f"{r.positive_share:.1%}, KL {r.kl:.2f} ± {r.kl_se:.2f}, distinct-2 "
              f"{r.distinct_2:.3f} ({r.n} responses)")
        rows.append({"alpha": alpha, **{k: v for k, v in r.to_dict().items() if k != "samples"}})
    return {"along_the_line": rows}


if __name__ == "__main__":
    main()

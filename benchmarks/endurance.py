"""Endurance: resident memory over many PPO iterations of a tiny configuration.

    python benchmarks/endurance.py [--iterations 500]

Prints the resident set size (RSS) after warm-up and at the end, and the growth in percent.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()

    import torch

    from ppolm import PPOConfig, TextGenerationEnv, Trainer, TransformerPolicy, char_tokenizer
    from ppolm.rollout.tasks import make_task

    torch.manual_seed(0)
    task = make_task("continue")
    tok = char_tokenizer(task.alphabet)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=task.max_new_tokens)
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig(iterations=args.iterations, batch_size=16, minibatch_size=4,
                        learning_rate=5e-4, kl_coef=0.01, progress=False, output_dir=out,
                        save_every=100)
        trainer = Trainer(TransformerPolicy(len(tok), hidden_size=32), env, cfg)
        samples: list[tuple[int, float]] = []
        done = threading.Event()

        def watch() -> None:       # sample RSS each time 25 more iterations are done
            seen = 0
            while not done.is_set():
                if trainer.iteration >= seen + 25:
                    seen = trainer.iteration - trainer.iteration % 25
                    samples.append((seen, rss_mib()))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        done.set()
        watcher.join()
    warm = next(r for i, r in samples if i >= args.warmup)
    end = samples[-1][1]
    print("iteration  rss_mib")
    for i, r in samples:
        print(f"{i:9d}  {r:7.1f}")
    print(f"rss after warm-up ({args.warmup} it): {warm:.1f} MiB; at {args.iterations}: "
          f"{end:.1f} MiB; growth {100 * (end - warm) / warm:+.1f}%; {seconds:.0f} s")


if __name__ == "__main__":
    main()

"""Can a linear value head on SmolLM2's hidden states predict the sentiment score?

    python benchmarks/value_probe.py [--prompts 24] [--n 8]

Samples ``n`` responses to each of ``prompts`` training prompts from the base
SmolLM2-135M-Instruct (temperature 1.0, 48 new tokens), scores them with VADER, and prints:

* how the score's variance splits between prompts and within a prompt (what a per-prompt
  baseline could remove);
* the explained variance of a ridge regression from the final hidden state at each response
  position to the response's final score, fitted on 3/4 of the prompts and scored on the held-out
  quarter (4 folds): the best a linear value head on the trunk could do on these states.

About 3 minutes on the 2-core CPU. README, Results, quotes its figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from smollm2_samples import repeated_prompts_env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy, env = repeated_prompts_env("train", args.prompts, args.n)
    gen = torch.Generator().manual_seed(7)
    feats, targets, groups, scores = [], [], [], []
    t0 = time.perf_counter()
    total = args.prompts * args.n
    for start in range(0, total, 32):
        idx = list(range(start, min(start + 32, total)))
        ep = env.sample(policy, len(idx), 1.0, torch.device("cpu"), gen, indices=idx)
        T = ep.response_mask.shape[1]
        with torch.no_grad():
            hidden = policy(ep.input_ids, ep.attention_mask, T, logits=False).hidden
        for row, i in enumerate(idx):
            valid = ep.response_mask[row].bool()
            feats.append(hidden[row][valid].numpy())                    # (t_i, H)
            targets.append(np.full(int(valid.sum()), float(ep.scores[row])))
            groups.append(np.full(int(valid.sum()), i // args.n))
            scores.append(float(ep.scores[row]))
    print(f"{len(scores)} responses in {time.perf_counter() - t0:.0f} s")

    s = np.array(scores).reshape(args.prompts, args.n)
    total, within = s.var(), s.var(axis=1).mean()
    print(f"score: mean {s.mean():.3f}, variance {total:.3f}: within a prompt {within:.3f}, "
          f"between prompts {total - within:.3f} ({(total - within) / total:.0%})")

    X, y, g = np.concatenate(feats), np.concatenate(targets), np.concatenate(groups)
    X = np.c_[X, np.ones(len(X))]                                          # bias column
    for ridge in (1.0, 10.0, 100.0, 1000.0):
        pred = np.zeros_like(y)
        for fold in range(4):
            test = g % 4 == fold
            A = X[~test]
            w = np.linalg.solve(A.T @ A + ridge * np.eye(A.shape[1]), A.T @ y[~test])
            pred[test] = X[test] @ w
        print(f"ridge {ridge:>6}: explained variance on held-out prompts "
              f"{1 - np.var(y - pred) / np.var(y):+.3f} ({len(y)} response tokens)")


if __name__ == "__main__":
    main()

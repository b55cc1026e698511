"""A linear probe on frozen SmolLM2-135M-Instruct features: how much of a preference set's labels
one hidden state carries (the response's last token, what a reward model reads, and the mean over
the response's tokens), at four depths.

For each feature, a logistic regression on (chosen - rejected) features (L2 penalty at three
strengths), trained on the training pairs, scored on the held-out pairs. The pairs are those
``examples/rlhf_smollm2.py`` writes (pairs_train.jsonl, pairs_eval.jsonl in its output folder).

    python benchmarks/reward_probe.py runs/rlhf_smollm2     # about 5 minutes on 2 cores

``--suffix TEXT`` appends TEXT to every response before the model reads it (the last token's
state is then that of the suffix's end: e.g. a question about the review's sentiment).
``--words`` fits the same regression to word counts instead (no model: a bag of words learnt
from the pairs) and scores the sum of VADER's lexicon valences of the words (no training: the
lexicon alone, without VADER's rules), as two references for what the labels hold.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time
from pathlib import Path

import torch

LAYERS = (8, 16, 24, 30)


def features(pairs: list[dict], batch: int = 16, suffix: str = ""
             ) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Per distinct (prompt, response): the last token's and the mean response state at each
    depth in LAYERS (30: the final, normed state), the model reading response + ``suffix``."""
    from ppolm.policies.pretrained import load_smollm2

    policy, tok = load_smollm2()
    lm = policy.lm.eval()
    keys = list(dict.fromkeys((r["prompt"], r[k]) for r in pairs for k in ("chosen", "rejected")))
    out = {}
    with torch.no_grad():
        for i in range(0, len(keys), batch):
            chunk = keys[i:i + batch]
            ids = [tok(p + c + suffix, add_special_tokens=False)["input_ids"] for p, c in chunk]
            starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p, _ in chunk]
            width = max(map(len, ids))
            x = torch.zeros(len(ids), width, dtype=torch.long)
            m = torch.zeros_like(x)
            for j, row in enumerate(ids):
                x[j, :len(row)], m[j, :len(row)] = torch.tensor(row), 1
            res = lm.model(input_ids=x, attention_mask=m, output_hidden_states=True)
            for j, key in enumerate(chunk):
                n, f = len(ids[j]), {}
                for layer in LAYERS:
                    h = res.last_hidden_state[j] if layer == 30 else res.hidden_states[layer][j]
                    f[f"last{layer}"], f[f"mean{layer}"] = h[n - 1], h[starts[j]:n].mean(0)
                out[key] = f
    return out


def differences(feats: dict, rows: list[dict], name: str) -> torch.Tensor:
    return torch.stack([feats[(r["prompt"], r["chosen"])][name]
                        - feats[(r["prompt"], r["rejected"])][name] for r in rows])


def probe(x: torch.Tensor, penalty: float, standardise: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of 'chosen first' on (standardised) differences (no intercept: the
    order of a pair is arbitrary)."""
    scale = x.std(0) + 1e-6 if standardise else torch.ones(x.shape[1])
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x / scale) @ w).mean() + penalty * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), scale


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+|[!?]", text.lower())


def word_references(train: list[dict], held: list[dict]) -> None:
    """A bag of words learnt from the training pairs (words seen at least twice), and VADER's
    lexicon summed over the words (no training)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    counts = collections.Counter(w for r in train for k in ("chosen", "rejected")
                                 for w in words(r[k]))
    vocab = {w: i for i, w in enumerate(w for w, c in counts.most_common() if c >= 2)}

    def count(text: str) -> torch.Tensor:
        v = torch.zeros(len(vocab))
        for w in words(text):
            if w in vocab:
                v[vocab[w]] += 1
        return v

    xt, xh = (torch.stack([count(r["chosen"]) - count(r["rejected"]) for r in rows])
              for rows in (train, held))
    for penalty in (1e-4, 1e-3, 1e-2):
        w, scale = probe(xt, penalty, standardise=False)       # counts, as they are
        acc_t = ((xt / scale) @ w > 0).float().mean().item()
        acc_h = ((xh / scale) @ w > 0).float().mean().item()
        print(f"words ({len(vocab)}) penalty {penalty:g}: train {acc_t:.3f}, held out {acc_h:.3f}")
    lexicon = SentimentIntensityAnalyzer().lexicon

    def valence(text: str) -> float:
        return sum(lexicon.get(w, 0.0) for w in words(text))

    right = sum(valence(r["chosen"]) > valence(r["rejected"]) for r in held)
    print(f"VADER's lexicon summed (no training): held out {right / len(held):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", type=Path, help="folder with pairs_train.jsonl and pairs_eval.jsonl")
    p.add_argument("--held-out", type=Path, help="held-out pairs from another folder's "
                   "pairs_eval.jsonl (default: the pairs folder's)")
    p.add_argument("--suffix", default="", help="text appended to every response")
    p.add_argument("--words", action="store_true", help="word counts and VADER's lexicon "
                   "instead of the model's states")
    args = p.parse_args()
    train, held = ([json.loads(line) for line in (folder / f"pairs_{part}.jsonl")
                    .read_text().splitlines()]
                   for folder, part in ((args.pairs, "train"),
                                        (args.held_out or args.pairs, "eval")))
    if args.words:
        word_references(train, held)
        return
    t0 = time.perf_counter()
    feats = features(train + held, suffix=args.suffix)
    print(f"{len(feats)} texts, features in {time.perf_counter() - t0:.0f} s")
    for layer in LAYERS:
        for kind in ("last", "mean"):
            name = f"{kind}{layer}"
            xt, xh = differences(feats, train, name), differences(feats, held, name)
            for penalty in (1e-4, 1e-3, 1e-2):
                w, scale = probe(xt, penalty)
                acc_t = ((xt / scale) @ w > 0).float().mean().item()
                acc_h = ((xh / scale) @ w > 0).float().mean().item()
                print(f"{name:7s} penalty {penalty:g}: train {acc_t:.3f}, held out {acc_h:.3f}")


if __name__ == "__main__":
    main()

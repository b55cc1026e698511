"""A linear probe on frozen SmolLM2-135M-Instruct features: how much of a preference set's labels
one hidden state carries (the response's last token, what a reward model reads, and the mean over
the response's tokens), at four depths.

For each feature, a logistic regression on (chosen - rejected) features (L2 penalty at three
strengths), trained on the training pairs, scored on the held-out pairs. The pairs are those
``examples/rlhf_smollm2.py`` writes (pairs_train.jsonl, pairs_eval.jsonl in its output folder).

    python benchmarks/reward_probe.py runs/rlhf_smollm2     # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LAYERS = (8, 16, 24, 30)


def features(pairs: list[dict], batch: int = 16) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Per distinct (prompt, response): the last token's and the mean response state at each
    depth in LAYERS (30: the final, normed state)."""
    from ppolm.policies.pretrained import load_smollm2

    policy, tok = load_smollm2()
    lm = policy.lm.eval()
    keys = list(dict.fromkeys((r["prompt"], r[k]) for r in pairs for k in ("chosen", "rejected")))
    out = {}
    with torch.no_grad():
        for i in range(0, len(keys), batch):
            chunk = keys[i:i + batch]
            ids = [tok(p + c, add_special_tokens=False)["input_ids"] for p, c in chunk]
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


def probe(x: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of 'chosen first' on standardised differences (no intercept: the
    order of a pair is arbitrary)."""
    scale = x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x / scale) @ w).mean() + penalty * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", type=Path, help="folder with pairs_train.jsonl and pairs_eval.jsonl")
    args = p.parse_args()
    train, held = ([json.loads(line) for line in (args.pairs / f"pairs_{part}.jsonl")
                    .read_text().splitlines()] for part in ("train", "eval"))
    t0 = time.perf_counter()
    feats = features(train + held)
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

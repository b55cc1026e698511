"""``ppolm train`` with a transformers policy writes ``output_dir/model/`` at the end (as TRL's
trainers save the final model), and ``ppolm export RUN_DIR OUT [--no-merge]`` writes the newest
checkpoint of a run as a model folder; both equal what the checkpoint holds. (The sharded
layout: tests/test_run_export.py and tests/test_distributed.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_llama


def ppolm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppolm", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def model_folder(tok, tmp_path):
    torch.manual_seed(0)
    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_train_writes_the_final_model_and_export_writes_a_checkpoints(model_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    done = ppolm("train", "model.kind=hf", f"model.path={model_folder}", "task=continue",
                 "iterations=2", "batch_size=8", "minibatch_size=4", "progress=false",
                 "engine=plain", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"model: {out / 'model'}" in done.stdout
    names = {f.name for f in (out / "model").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "value_head.safetensors"} <= names
    final = load_file(out / "checkpoints" / "iter-0000002" / "policy" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k
    done = ppolm("export", str(out), str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == final.keys()


@pytest.mark.slow
def test_export_of_a_lora_run_merged_or_adapters_alone(model_folder, tmp_path):
    peft = pytest.importorskip("peft")
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"kind": "hf", "path": str(model_folder),
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "task": "continue", "ppo": {"iterations": 1, "batch_size": 8, "minibatch_size": 4,
                                    "progress": False, "engine": "plain",
                                    "output_dir": str(tmp_path / "run")}}))
    done = ppolm("train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adapter_config.json" not in {f.name for f in (tmp_path / "run" / "model").iterdir()}
    done = ppolm("export", str(tmp_path / "run"), str(tmp_path / "adapters"), "--no-merge")
    assert done.returncode == 0, done.stderr[-3000:]
    # the adapters on their base equal the merged model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapters")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - merged(ids).logits).abs().max() < 1e-5


def test_export_of_a_folder_without_a_run_is_a_one_line_error(tmp_path):
    done = ppolm("export", str(tmp_path), str(tmp_path / "out"))
    assert done.returncode == 2
    assert "No complete checkpoint" in done.stderr and "Traceback" not in done.stderr


def test_a_run_spec_under_fsdp_builds_a_folders_model_on_the_meta_device(model_folder):
    from ppolm.run import ModelSpec, _load_pretrained

    policy, _ = _load_pretrained(ModelSpec(kind="hf", path=str(model_folder)), empty=True)
    assert all(p.is_meta for p in policy.parameters())
    policy, _ = _load_pretrained(ModelSpec(kind="hf", path=str(model_folder)))
    assert not any(p.is_meta for p in policy.parameters())


@pytest.mark.slow
def test_train_under_torchrun_with_fsdp_writes_the_model_from_the_shards(model_folder, tmp_path):
    """2 gloo ranks, FSDP2, the policy built on the meta device by every rank: the final
    model is the last (sharded) checkpoint's weights."""
    import os

    from ppolm.checkpoint.run_export import read_shards

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "ppolm", "train", "model.kind=hf",
                           f"model.path={model_folder}", "task=continue", "iterations=2",
                           "batch_size=8", "minibatch_size=4", "progress=false",
                           "ppo.distributed=fsdp", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(f"model: {out / 'model'}") == 1              # rank 0 alone
    shards = read_shards(out / "checkpoints" / "iter-0000002")
    exported = load_file(out / "model" / "model.safetensors")
    for k, v in exported.items():
        assert torch.equal(v, shards[f"policy.model.{k}"]), k

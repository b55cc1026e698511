"""The reward-model trainer under FSDP2 (``distributed='fsdp'``): the setting in the config and
in ``ppolm train-rm``, LoRA refused, and on 2 gloo ranks under torchrun
(tests/distributed/rm_fsdp_worker.py) the update and the saved model of one process, and an
exact resume from DCP shards."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ALPHABET, tiny_llama
from ppolm import ConfigError, char_tokenizer
from ppolm.config.reward_model import RewardModelConfig, RewardModelSpec
from ppolm.errors import CheckpointError
from ppolm.observe.metrics import read_metrics
from test_reward_model_trainer import preference_rows

WORKER_FILE = Path(__file__).parent / "distributed" / "rm_fsdp_worker.py"
TOL = 1e-6             # FSDP2 on 2 ranks against one process, float32 weights


def load_worker():
    spec = importlib.util.spec_from_file_location("rm_fsdp_worker", WORKER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = load_worker()


def prepare(folder: Path) -> Path:
    """base/ (a tiny Llama with random weights and its tokenizer), pairs.jsonl and rm.yaml."""
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    tiny_llama(len(tok)).save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                for r in preference_rows(48)))
    spec = {"model": "base", "train": "pairs.jsonl",
            "training": {"steps": 2, **worker.SETTINGS}}
    (folder / "rm.yaml").write_text(yaml.safe_dump(spec))
    return folder


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --- in one process ---------------------------------------------------------------------------
def test_the_setting_is_validated_and_read_by_train_rm(tmp_path):
    assert RewardModelConfig().distributed == "ddp"
    with pytest.raises(ConfigError, match="'ddp', 'fsdp'"):
        RewardModelConfig(distributed="zero3")
    prepare(tmp_path)
    spec = RewardModelSpec.load(tmp_path / "rm.yaml", ["distributed=fsdp"])
    assert spec.training.distributed == "fsdp"
    with pytest.raises(ConfigError, match="LoRA under distributed='fsdp'.*use distributed='ddp'"):
        RewardModelSpec.load(tmp_path / "rm.yaml", ["training.distributed=fsdp", "lora={r: 4}"])


def test_lora_is_refused_when_sharded():
    from peft import LoraConfig

    from ppolm.policies.reward_model import RewardModel
    from ppolm.reward_modeling import ranks

    lora = LoraConfig(r=4, target_modules=["q_proj"])
    model = RewardModel(tiny_llama(len(char_tokenizer(ALPHABET))), lora)
    with pytest.raises(ConfigError, match="merges the adapters into the trunk"):
        ranks.wrap(model, "fsdp", torch.device("cpu"), bf16=False)


def test_a_gathered_state_saves_the_same_folder(tmp_path):
    from ppolm.policies.reward_model import RewardModel, load_reward_model

    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    model = RewardModel(tiny_llama(len(tok))).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.score.weight.zero_()            # the folder must hold `state`, not the model
    model.save_pretrained(tmp_path / "rm", tok, state=state)
    loaded, _, _ = load_reward_model(tmp_path / "rm")
    assert max_diff(state, loaded.state_dict()) == 0.0


# --- two ranks under torchrun -------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The worker's runs on 2 gloo ranks (FSDP2), over files prepared here."""
    folder = prepare(tmp_path_factory.mktemp("rm_fsdp"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(WORKER_FILE), str(folder)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-6000:]
    (folder / "stderr.txt").write_text(done.stderr)
    (folder / "stdout.txt").write_text(done.stdout)
    return folder


@pytest.mark.slow
def test_one_update_on_two_ranks_equals_one_process(two_ranks):
    one = worker.make_trainer(two_ranks, steps=1)
    before = {k: v.clone() for k, v in one.model.state_dict().items()}
    one.train()
    two = torch.load(two_ranks / "update.pt", weights_only=False)
    after = one.model.state_dict()
    assert max_diff(after, two["state"]) < TOL
    # the test could fail: every tensor moved by far more than the tolerance
    assert min(float((after[k] - before[k]).abs().max()) for k in after) > 100 * TOL
    for name in ("loss", "accuracy", "grad_norm", "score_std", "eval/accuracy", "eval/loss"):
        assert two["row"][name] == pytest.approx(one.history[-1][name], abs=1e-5), name


@pytest.mark.slow
def test_save_model_under_fsdp_is_read_by_transformers_with_the_same_scores(two_ranks):
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(two_ranks / "update-model").eval()
    tok = char_tokenizer(ALPHABET)
    tok.padding_side = "right"
    enc = tok(worker.TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = loaded(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, 0]
    ours = torch.load(two_ranks / "update-scores.pt")
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (two_ranks / "update-model" / "reward_normalization.json").is_file()
    # FSDP2 warns when a wrapped module returns a view; the scores are tensors of their own
    assert "view tensor" not in (two_ranks / "stderr.txt").read_text()


@pytest.mark.slow
def test_train_rm_with_fsdp_writes_the_model_of_one_process(two_ranks, tmp_path):
    from safetensors.torch import load_file

    from ppolm.cli import main

    assert (two_ranks / "cli-status.txt").read_text() == "0"
    assert "for 2 steps on 2 ranks (fsdp)" in (two_ranks / "stdout.txt").read_text()
    assert main(["train-rm", str(two_ranks / "rm.yaml"), f"output_dir={tmp_path / 'one'}"]) == 0
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(two_ranks / "cli" / "model" / "model.safetensors")
    assert max_diff(a, b) < TOL
    base = load_file(two_ranks / "base" / "model.safetensors")
    assert float((a["model.norm.weight"] - base["model.norm.weight"]).abs().max()) > 100 * TOL
    ra, rb = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(
        two_ranks / "cli" / "metrics.jsonl")
    assert [r["iteration"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb, strict=True):
        assert y["eval/accuracy"] == x["eval/accuracy"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)


@pytest.mark.slow
def test_resume_from_shards_equals_an_uninterrupted_run(two_ranks):
    got = torch.load(two_ranks / "resume.pt", weights_only=False)
    assert got["reached"] == 2 and got["optimizer_equal"]
    assert max_diff(got["whole"], got["resumed"]) == 0.0            # bit for bit
    checkpoint = two_ranks / "resumed" / "checkpoints" / "iter-0000004"
    assert (checkpoint / "models" / ".metadata").is_file()          # DCP's shards
    drop = ("time_step",)
    ma, mb = (read_metrics(two_ranks / d / "metrics.jsonl") for d in ("whole", "resumed"))
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == \
        [{k: v for k, v in r.items() if k not in drop} for r in mb]
    one = worker.make_trainer(two_ranks, steps=4)
    with pytest.raises(CheckpointError, match="FSDP2 shards of 2 ranks"):
        one.resume(checkpoint)

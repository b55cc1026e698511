"""``ppolm train-rm CONFIG.yaml key=value ... [--resume]`` with a tiny model folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_llama
from ppolm.cli import main
from ppolm.observe.metrics import read_metrics
from test_reward_model_trainer import preference_rows


@pytest.fixture
def config(tok, tmp_path):
    """A YAML config beside a tiny causal LM folder and the pairs (relative paths)."""
    torch.manual_seed(0)
    tiny_llama(len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
            for r in preference_rows(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"model": "base", "train": "pairs.jsonl",
            "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"},
            "training": {"steps": 3, "batch_size": 8, "learning_rate": 1e-3,
                         "eval_fraction": 0.2, "eval_every": 2, "progress": False,
                         "output_dir": "out"}}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "rm.yaml"


def test_train_rm_writes_metrics_and_a_transformers_reward_model(config, capsys):
    from transformers import AutoModelForSequenceClassification

    assert main(["train-rm", str(config), "training.learning_rate=2e-3"]) == 0
    said = capsys.readouterr().out
    out = config.parent / "out"
    assert "on 32 pairs (8 held out) for 3 steps" in said and "held-out pair accuracy" in said
    assert f"model: {out / 'model'}" in said
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.num_labels == 1
    assert set(json.loads((out / "model" / "reward_normalization.json").read_text())) == {
        "mean", "std", "count"}
    assert yaml.safe_load((out / "run.yaml").read_text())["training"]["learning_rate"] == 2e-3
    # a second start refuses the earlier run; --resume continues it
    assert main(["train-rm", str(config), "steps=5"]) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(["train-rm", str(config), "steps=5", "--resume"]) == 0
    assert "resumed at step 3" in capsys.readouterr().out
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_bad_keys_and_data_are_one_line_errors(config, capsys):
    assert main(["train-rm", str(config), "learnig_rate=1"]) == 2
    assert "Did you mean 'learning_rate'" in capsys.readouterr().err
    assert main(["train-rm", str(config), "columns.chosen=nope"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ppolm: error: row 0 has no 'nope' column")
    assert main(["train-rm", "steps=3"]) == 2
    assert "needs a config file first" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_under_torchrun_train_the_model_of_one_process(config, tmp_path):
    """torchrun --nproc-per-node 2 (gloo): each rank scores half of every batch and DDP
    averages the gradients, so the weights equal one process's up to float rounding."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["-m", "ppolm", "train-rm", str(config), "steps=2", "eval_fraction=0.0"]
    one = subprocess.run([sys.executable, *common, f"output_dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", *common,
                          f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert not torch.equal(a["model.norm.weight"], base["model.norm.weight"])    # it trained

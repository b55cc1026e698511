"""The command line: the built-in default run, YAML configs, overrides and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ppolm.cli import main
from ppolm.errors import ConfigError
from ppolm.run import RunSpec


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppolm.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=1800)


def test_default_run_completes_and_reward_rises(tmp_path):
    out = run_cli("train", f"ppo.output_dir={tmp_path}/run", "ppo.progress=false")
    assert out.returncode == 0, out.stderr
    assert f"metrics: {tmp_path}/run/metrics.jsonl" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == RunSpec().ppo.iterations
    first = sum(r["score_mean"] for r in rows[:10]) / 10
    last = sum(r["score_mean"] for r in rows[-10:]) / 10
    assert last > first + 0.5, (first, last)
    assert (tmp_path / "run/checkpoints").is_dir()


def test_yaml_config_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{kind: lstm, hidden_size: 32}}
task: target_char
env: {{max_new_tokens: 4}}
ppo: {{iterations: 2, batch_size: 8, minibatch_size: 4, output_dir: {tmp_path}/out}}
""")
    assert main(["train", str(cfg), "learning_rate=1e-3", "ppo.progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "lstm policy on task=target_char for 2 iterations" in printed
    saved = (tmp_path / "out/run.yaml").read_text()
    assert "learning_rate: 0.001" in saved and "kind: lstm" in saved


def test_module_class_reward_and_prompts_file(tmp_path):
    (tmp_path / "myreward.py").write_text(
        "from ppolm import RewardFunction\n"
        "class Short(RewardFunction):\n"
        "    def __init__(self, scale=1.0):\n"
        "        self.scale = scale\n"
        "    def __call__(self, prompts, responses):\n"
        "        return [-self.scale * len(r) for r in responses]\n")
    (tmp_path / "prompts.txt").write_text("abc\nhij\n")
    out = subprocess.run(
        [sys.executable, "-m", "ppolm.cli", "train", "prompts=prompts.txt",
         "reward=myreward:Short", "reward_kwargs={scale: 2.0}", "ppo.iterations=1",
         "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.progress=false",
         f"ppo.output_dir={tmp_path}/o"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "prompts=prompts.txt" in out.stdout


@pytest.mark.parametrize("args,words", [
    (["learnin_rate=1"], "Did you mean 'learning_rate'"),
    (["model.kind=rnn"], "kind='rnn'"),
    (["ppo.batch_size=30"], "not divisible"),
    (["reward=nosuchreward", "task=null", "prompts=x.txt"], "Unknown reward 'nosuchreward'"),
    (["foo.bar=1"], "Unknown section 'foo'"),
    (["missing.yaml"], "does not exist"),
])
def test_bad_input_gives_a_one_line_error(args, words, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppolm: error:") and "Traceback" not in err
    assert __import__("re").search(words, err), err


def test_run_spec_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="Did you mean 'model'"):
        RunSpec.from_dict({"modle": {}})

"""The command line: the built-in default run, YAML configs, overrides and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppolm import PPOConfig
from ppolm.cli import main
from ppolm.errors import ConfigError
from ppolm.run import RunSpec


def run_cli(*args: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m ppolm ARGS`` in a fresh process (the command sets process-wide malloc
    options on CPU, which a test process should not take on)."""
    return subprocess.run([sys.executable, "-m", "ppolm", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def ppolm_script() -> str:
    """The ``ppolm`` console script installed next to this interpreter."""
    script = Path(sys.executable).parent / "ppolm"
    if not script.is_file():
        pytest.skip("the ppolm console script is not installed (pip install -e .)")
    return str(script)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


SMALL = ["iterations=3", "batch_size=8", "minibatch_size=4", "progress=false"]


def test_default_run_without_a_config_writes_to_runs_default(tmp_path):
    out = subprocess.run([ppolm_script(), "train", *SMALL], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "transformer policy on task=continue for 3 iterations" in out.stdout
    assert "metrics: runs/default/metrics.jsonl" in out.stdout
    run = tmp_path / "runs/default"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]       # nothing else written
    files = {p.name for p in run.iterdir()}             # warnings.jsonl if the run had any
    assert files - {"warnings.jsonl"} == {"checkpoints", "metrics.jsonl", "run.yaml",
                                          "samples.jsonl"}
    assert [r["iteration"] for r in metrics(run)] == [1, 2, 3]
    assert (run / "checkpoints/iter-0000003/COMPLETE").is_file()
    saved = yaml.safe_load((run / "run.yaml").read_text())
    demo = RunSpec.load(None, SMALL)
    assert saved["ppo"]["output_dir"] == "runs/default" and saved["task"] == "continue"
    assert saved["ppo"]["kl_coef"] == demo.ppo.kl_coef == 0.01         # the demo file's
    assert saved["ppo"]["learning_rate"] == demo.ppo.learning_rate
    assert saved["ppo"]["iterations"] == 3
    # the command (not the library) turns on malloc keeping freed memory on a CPU
    assert saved["ppo"]["keep_freed_memory"] is True and PPOConfig().keep_freed_memory is False


@pytest.mark.slow
def test_default_run_completes_and_reward_rises(tmp_path):
    out = subprocess.run([ppolm_script(), "train", "ppo.progress=false"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=1800)
    assert out.returncode == 0, out.stderr
    rows = metrics(tmp_path / "runs/default")
    assert len(rows) == RunSpec.load(None, []).ppo.iterations == 200
    first = sum(r["score_mean"] for r in rows[:10]) / 10
    last = sum(r["score_mean"] for r in rows[-10:]) / 10
    assert last > first + 0.5, (first, last)
    assert (tmp_path / "runs/default/checkpoints/iter-0000200/COMPLETE").is_file()


def test_python_m_ppolm_train_writes_into_output_dir(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out_dir = tmp_path / "out"
    out = run_cli("train", "iterations=2", "batch_size=8", "minibatch_size=4", "progress=false",
                  f"output_dir={out_dir}", cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert f"metrics: {out_dir}/metrics.jsonl" in out.stdout
    assert f"checkpoints: {out_dir}/checkpoints" in out.stdout
    assert list(cwd.iterdir()) == []                                    # no runs/ here
    assert [r["iteration"] for r in metrics(out_dir)] == [1, 2]
    assert (out_dir / "checkpoints/iter-0000002/COMPLETE").is_file()
    saved = yaml.safe_load((out_dir / "run.yaml").read_text())
    assert saved["ppo"]["output_dir"] == str(out_dir) and saved["ppo"]["iterations"] == 2
    # --resume continues the finished run (nothing left to do) instead of refusing it
    again = run_cli("train", "iterations=2", "batch_size=8", "minibatch_size=4",
                    "progress=false", f"output_dir={out_dir}", "--resume", cwd=cwd)
    assert again.returncode == 0, again.stderr
    assert "resumed at iteration 2" in again.stdout
    assert len(metrics(out_dir)) == 2


def test_yaml_config_with_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{kind: lstm, hidden_size: 32}}
task: target_char
env: {{max_new_tokens: 4}}
ppo: {{iterations: 2, batch_size: 8, minibatch_size: 4, output_dir: {tmp_path}/out}}
""")
    out = run_cli("train", str(cfg), "learning_rate=1e-3", "ppo.progress=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "lstm policy on task=target_char for 2 iterations" in out.stdout
    saved = (tmp_path / "out/run.yaml").read_text()
    assert "learning_rate: 0.001" in saved and "kind: lstm" in saved
    assert len(metrics(tmp_path / "out")) == 2
    assert not (tmp_path / "runs").exists()


def test_yaml_without_output_dir_writes_to_runs_and_its_stem(tmp_path):
    (tmp_path / "my_experiment.yaml").write_text(
        "model: {kind: lstm, hidden_size: 16, n_layers: 1}\ntask: target_char\n"
        "env: {max_new_tokens: 3}\n"
        "ppo: {run: {progress: false}, algorithm: {iterations: 1, batch_size: 4, "
        "minibatch_size: 2}}\n")
    out = run_cli("train", "my_experiment.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs/my_experiment"
    assert "metrics: runs/my_experiment/metrics.jsonl" in out.stdout
    files = {p.name for p in run.iterdir()}             # warnings.jsonl if the run had any
    assert files - {"warnings.jsonl"} == {"checkpoints", "metrics.jsonl", "run.yaml",
                                          "samples.jsonl"}
    assert len(metrics(run)) == 1 and (run / "checkpoints/iter-0000001/COMPLETE").is_file()
    saved = yaml.safe_load((run / "run.yaml").read_text())
    assert saved["ppo"]["output_dir"] == "runs/my_experiment"
    # settings the file leaves open take PPOConfig's defaults, as from Python
    assert saved["ppo"]["kl_coef"] == PPOConfig().kl_coef
    assert saved["ppo"]["learning_rate"] == PPOConfig().learning_rate


def test_show_config_prints_the_demo_run(capsys):
    assert main(["show-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == RunSpec.load(None, []).to_dict()
    assert shown["ppo"]["kl_coef"] == 0.01 and shown["ppo"]["iterations"] == 200


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
        [sys.executable, "-m", "ppolm", "train", "prompts=prompts.txt",
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


# --- issue 34: runs the command line could not do, and what it said ----------------------
TINY = [*SMALL, "ppo_epochs=1", "model.hidden_size=16", "model.n_layers=1"]


def run_script(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ppolm ARGS`` through the installed console script (sys.path[0] is its own folder,
    not the current one, unlike ``python -m ppolm``)."""
    return subprocess.run([ppolm_script(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.mark.parametrize("value", ["auto", "none", "null"])
def test_a_critic_free_run_from_the_command_line(tmp_path, value):
    out = run_cli("train", *TINY, "samples_per_prompt=4", "advantage_estimator=reinforce_pp",
                  f"model.value={value}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = yaml.safe_load((tmp_path / "runs/default/run.yaml").read_text())
    assert saved["sampling"]["samples_per_prompt"] == 4
    assert len(metrics(tmp_path / "runs/default")) == 3


def test_show_config_marks_the_demo_values_and_pins_no_output_dir(capsys):
    assert main(["show-config"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "  learning_rate: 0.001  # default: 0.0003" in lines
    assert "  max_new_tokens: 6  # default: 16" in lines
    assert "  gamma: 1.0" in lines                         # the default: no mark
    assert "  output_dir: null" in lines
    marked = {line.split(":")[0].strip() for line in lines if "  # default:" in line}
    assert marked == {"max_new_tokens", "iterations", "batch_size", "minibatch_size",
                      "learning_rate", "lr_schedule", "ent_coef", "kl_coef", "health_checks"}


def test_the_getting_started_commands_run_one_after_the_other(tmp_path):
    """docs/getting-started.md's first commands as written, in a fresh folder (with small
    sizes appended to each ``ppolm train``; the slow test below runs them as written)."""
    for command in getting_started_commands():
        extra = TINY if command[0] == "train" else []
        out = run_script(*command, *extra, cwd=tmp_path)
        assert out.returncode == 0, (command, out.stderr)
    assert (tmp_path / "runs/default/report.html").is_file()
    assert (tmp_path / "runs/tb/tensorboard").is_dir()


@pytest.mark.slow
def test_the_getting_started_commands_as_written(tmp_path):
    for command in getting_started_commands():
        out = run_script(*command, cwd=tmp_path, timeout=1800)
        assert out.returncode == 0, (command, out.stderr)


def getting_started_commands() -> list[list[str]]:
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    text = (Path(__file__).parents[1] / "docs/getting-started.md").read_text()
    block = text.split("## The first run, from the command line")[1].split("```bash")[1]
    block = block.split("```")[0]
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["ppolm", "train"], ["ppolm", "report"],
                                         ["ppolm", "train"]]
    return [c[1:] for c in commands]


REWARD_MODULE = ("from ppolm import RewardFunction\n"
                 "class Short(RewardFunction):\n"
                 "    def __call__(self, prompts, responses):\n"
                 "        return [-float(len(r)) for r in responses]\n")


def test_a_reward_module_beside_the_config_or_in_the_current_folder_with_the_script(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/beside.py").write_text(REWARD_MODULE)
    (tmp_path / "conf/prompts.txt").write_text("abc\nhij\n")
    (tmp_path / "conf/run.yaml").write_text("task: null\nprompts: prompts.txt\n"
                                            "reward: beside:Short\nmodel: {kind: hf, path: x}\n")
    (tmp_path / "here.py").write_text(REWARD_MODULE)
    # the config file's folder (a transformers model needs a path; an error after the reward
    # was found would name the model, so build only what the reward needs: the task's model)
    out = run_script("train", "conf/run.yaml", "model.kind=transformer", "task=continue",
                     *TINY, "output_dir=o1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = run_script("train", "reward=here:Short", *TINY, "output_dir=o2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = run_script("train", "reward=nowhere:Short", *TINY, cwd=tmp_path)
    assert out.returncode == 2
    assert f"looked in {tmp_path} and the installed packages" in out.stderr


def test_a_resume_takes_a_new_learning_rate_refuses_a_new_batch_size_and_says_so(tmp_path):
    (tmp_path / "my.yaml").write_text("ppo: {lr_schedule: constant}\n")
    base = ["train", "my.yaml", *TINY, "output_dir=runs/x"]
    first = run_cli(*base, "iterations=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    refused = run_cli(*base, "iterations=3", "batch_size=16", "--resume", cwd=tmp_path)
    assert refused.returncode == 2
    assert "ppo.batch_size: 8 -> 16" in refused.stderr and "Traceback" not in refused.stderr
    again = run_cli(*base, "iterations=3", "learning_rate=0.5", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    rows = metrics(tmp_path / "runs/x")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[1]["lr"] == PPOConfig().learning_rate and rows[2]["lr"] == 0.5
    saved = yaml.safe_load((tmp_path / "runs/x/run.yaml").read_text())
    assert saved["ppo"]["learning_rate"] == 0.5
    assert "first after resume (iteration 3)" in again.stdout


def test_an_old_place_in_a_config_file_is_said_on_stderr(tmp_path):
    (tmp_path / "old.yaml").write_text("env: {max_new_tokens: 3}\n")
    out = run_cli("train", "old.yaml", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ppolm: warning: env.max_new_tokens (in old.yaml) is now sampling.max_new_tokens" \
        in out.stderr

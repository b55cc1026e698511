"""EvalCallback in real (tiny) runs: eval/* metrics at the right iterations in the history,
metrics.jsonl and the result files; training unchanged by evaluating (its random streams are
untouched) and resumed exactly; the best iteration kept as a checkpoint; bad input refused."""

from __future__ import annotations

import json

import pytest

from conftest import toy_trainer
from ppolm import Callback, EvalCallback
from ppolm.checkpoint.folders import COMPLETE
from ppolm.errors import ConfigError
from ppolm.evaluation.callback import EVAL_FIGURES
from ppolm.observe.metrics import read_metrics
from ppolm.rollout.tasks import make_task

HELD_OUT = make_task("continue").prompts[:6]
TIMINGS = ("time_", "tokens_per_s", "episodes_per_s", "eval/seconds")


def trainer_with(out, callbacks, **overrides):
    settings = dict(iterations=4, save_every=2, health_checks=False)
    trainer = toy_trainer(out, **{**settings, **overrides})
    trainer.callbacks.callbacks[:0] = callbacks        # before the Trainer's own
    return trainer


def numbers(rows):
    """The rows without timings (which differ from run to run)."""
    return [{k: v for k, v in row.items() if not k.startswith(TIMINGS)} for row in rows]


def test_eval_metrics_are_logged_every_n_iterations_and_after_the_last(tmp_path):
    trainer = trainer_with(tmp_path, [EvalCallback(HELD_OUT, every=3)])
    history = trainer.train()
    evaluated = [row["iteration"] for row in history if "eval/score_mean" in row]
    assert evaluated == [3, 4]
    row = history[2]
    assert {f"eval/{k}" for k in EVAL_FIGURES} <= set(row)
    assert 0 <= row["eval/eos_fraction"] <= 1 and isinstance(row["eval/kl"], float)
    assert numbers(read_metrics(tmp_path / "metrics.jsonl")) == numbers(history)
    saved = json.loads((tmp_path / "eval" / "iter-0000003.json").read_text())
    assert saved["reward_mean"] == row["eval/score_mean"] and saved["n"] == len(HELD_OUT)
    assert saved["settings"]["seed"] == 0


def test_evaluating_leaves_training_unchanged(tmp_path):
    plain = trainer_with(tmp_path / "plain", []).train()
    evaluated = trainer_with(tmp_path / "eval", [EvalCallback(HELD_OUT, every=1)]).train()
    without_eval = [{k: v for k, v in row.items() if not k.startswith("eval/")}
                    for row in evaluated]
    assert numbers(without_eval) == numbers(plain)


def test_a_resumed_run_evaluates_and_keeps_the_best_as_an_unbroken_run_does(tmp_path):
    def callback():
        return EvalCallback(HELD_OUT, every=1, keep_best="eval/score_mean", seed=3)

    straight = trainer_with(tmp_path / "straight", [callback()])
    whole = straight.train()
    first = trainer_with(tmp_path / "resumed", [callback()], iterations=4)
    first.callbacks.callbacks.insert(0, StopAt(2))
    first.train()
    second = trainer_with(tmp_path / "resumed", [callback()])
    assert second.resume() == 2
    second.train()
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert numbers(resumed) == numbers(whole)

    scores = [row["eval/score_mean"] for row in whole]
    best_at = scores.index(max(scores)) + 1           # the first of the best
    for run in ("straight", "resumed"):
        folder = tmp_path / run / "best"
        assert (folder / COMPLETE).is_file() and (folder / "policy").is_dir()
        best = json.loads((folder / "best.json").read_text())
        assert best == {"metric": "eval/score_mean", "value": max(scores),
                        "iteration": best_at}


class StopAt(Callback):
    def __init__(self, at):
        self.at = at

    def on_iteration_end(self, trainer, metrics):
        return metrics["iteration"] == self.at


def test_keep_best_without_an_output_dir_is_refused(tmp_path):
    trainer = trainer_with(tmp_path, [EvalCallback(HELD_OUT, keep_best="eval/score_mean")],
                           save_every=0, output_dir=None)
    with pytest.raises(ConfigError, match="needs an output_dir"):
        trainer.train()


@pytest.mark.parametrize("kwargs,match", [
    ({"prompts": []}, "non-empty"), ({"every": 0}, "every=0"), ({"mode": "up"}, "mode='up'")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EvalCallback(**{"prompts": HELD_OUT, **kwargs})


def test_the_run_spec_evaluates_during_training(tmp_path):
    from ppolm.run import RunSpec, build_run

    spec = RunSpec.load(None, ["iterations=2", "batch_size=8", "minibatch_size=4",
                               "progress=false", f"output_dir={tmp_path}", "eval_every=1",
                               "eval_prompts=[abc, def]", "keep_best=eval/score_mean"])
    trainer = build_run(spec)
    history = trainer.train()
    assert [row["eval/score_mean"] is not None for row in history] == [True, True]
    assert (tmp_path / "best" / "best.json").is_file()
    with pytest.raises(ConfigError, match="keep_best needs eval_prompts"):
        build_run(RunSpec.load(None, ["keep_best=eval/score_mean"]))

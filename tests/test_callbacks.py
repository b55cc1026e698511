"""Callbacks in a real (tiny) run: the hooks are called in order with the right arguments, a
callback can stop training (with a checkpoint, and resume continues), only Callback instances
are accepted, and the HealthMonitor is quiet on a healthy run."""

from __future__ import annotations

import warnings

import pytest
import torch

from ppolm import (
    Callback,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    char_tokenizer,
)
from ppolm.errors import ConfigError
from ppolm.observe.health import HealthMonitor, PPOHealthWarning
from ppolm.observe.metrics import read_metrics
from ppolm.rollout.tasks import make_task


def make_trainer(out, callbacks=None, max_new_tokens=4, **overrides):
    """A Trainer of a small TransformerPolicy on the 'continue' toy task (3 iterations of 8
    episodes); ``out`` None: no files."""
    torch.manual_seed(0)
    task = make_task("continue")
    tok = char_tokenizer(task.alphabet)
    policy = TransformerPolicy(len(tok), hidden_size=32)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=max_new_tokens, seed=0)
    settings = dict(iterations=3, batch_size=8, minibatch_size=4, ppo_epochs=2,
                    learning_rate=1e-3, progress=False, keep_checkpoints=10,
                    output_dir=None if out is None else str(out))
    return Trainer(policy, env, PPOConfig(**{**settings, **overrides}), callbacks=callbacks)


class Recorder(Callback):
    """Keeps every call, in order; asks to stop after iteration ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.stop_at = stop_at

    def on_train_begin(self, trainer):
        self.calls.append(("begin", trainer, trainer.iteration))

    def on_iteration_end(self, trainer, metrics):
        self.calls.append(("iteration", trainer, metrics))
        return metrics["iteration"] == self.stop_at

    def on_save(self, trainer, path):
        # the checkpoint is complete when the hook runs
        self.calls.append(("save", trainer, path, (path / "config.yaml").exists()))

    def on_train_end(self, trainer, history):
        self.calls.append(("end", trainer, history))


def test_the_hooks_are_called_in_order_with_the_loop_s_values(tmp_path):
    first, second = Recorder(), Recorder()
    trainer = make_trainer(tmp_path, [first, second], save_every=2)
    history = trainer.train()
    assert first.calls == second.calls                   # every callback, each hook in turn
    kinds = [c[0] for c in first.calls]
    assert kinds == ["begin", "iteration", "iteration", "save", "iteration", "save", "end"]
    assert all(c[1] is trainer for c in first.calls)
    assert first.calls[0][2] == 0                         # before the first iteration
    rows = [c[2] for c in first.calls if c[0] == "iteration"]
    assert len(history) == 3
    assert all(row is logged for row, logged in zip(rows, history, strict=True))
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    saves = [c for c in first.calls if c[0] == "save"]
    folder = tmp_path / "checkpoints"
    assert [c[2] for c in saves] == [folder / "iter-0000002", folder / "iter-0000003"]
    assert all(c[3] for c in saves)
    end = first.calls[-1][2]
    assert end == history and all(a is b for a, b in zip(end, history, strict=True))


def test_a_callback_can_stop_training_with_a_checkpoint_and_resume_continues(tmp_path):
    stopper = Recorder(stop_at=2)
    trainer = make_trainer(tmp_path, [stopper])
    history = trainer.train()
    assert trainer.iteration == 2 and [row["iteration"] for row in history] == [1, 2]
    assert [c[0] for c in stopper.calls] == ["begin", "iteration", "iteration", "save", "end"]
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["iter-0000002"]
    assert stopper.calls[3][2] == folder / "iter-0000002"

    later = Recorder()
    resumed = make_trainer(tmp_path, [later])
    assert resumed.resume() == 2
    rows = resumed.train()
    assert resumed.iteration == 3 and [row["iteration"] for row in rows] == [3]
    assert [c[0] for c in later.calls] == ["begin", "iteration", "save", "end"]
    assert later.calls[0][2] == 2                          # begins where the checkpoint left
    assert (folder / "iter-0000003").is_dir()
    assert [row["iteration"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("bad", [object(), lambda trainer, metrics: None, HealthMonitor])
def test_only_callback_instances_are_accepted(bad):
    with pytest.raises(ConfigError, match="ppolm.Callback instances"):
        make_trainer(None, [Recorder(), bad])


def run_monitored(max_new_tokens):
    """A slow run (learning rate 1e-5, 2 iterations) under a HealthMonitor, no output_dir."""
    monitor, recorder = HealthMonitor(), Recorder()
    trainer = make_trainer(None, [monitor, recorder], max_new_tokens, iterations=2,
                           learning_rate=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.train()
    assert "save" not in [c[0] for c in recorder.calls]      # no output_dir: nothing saved
    assert len(history) == 2 and monitor.seen == 2
    return monitor, history, [w for w in caught if issubclass(w.category, PPOHealthWarning)]


def test_the_health_monitor_is_quiet_on_a_healthy_run():
    """Nothing fires: the KL stays near 0, the ratios barely move, the entropy stays put, and
    with room for 24 tokens most responses of the untrained policy end with EOS."""
    monitor, history, found = run_monitored(max_new_tokens=24)
    assert found == [] and monitor.warnings == [], [str(w.message) for w in found]
    assert monitor.first_entropy == history[0]["entropy"]
    assert all(row["eos_fraction"] >= 0.2 for row in history)


def test_the_health_monitor_sees_cut_responses_in_a_real_run():
    """With 4 tokens of room, the untrained policy (EOS about 1 token in 14) is cut for most
    of the batch: the truncation warning legitimately fires, once, with the batch's share,
    and nothing else does."""
    monitor, history, found = run_monitored(max_new_tokens=4)
    assert [w["name"] for w in monitor.warnings] == ["truncated"]
    assert [str(w.message) for w in found] == [monitor.warnings[0]["message"]]
    first = next(row for row in history if row["eos_fraction"] < 0.2)
    assert monitor.warnings[0]["iteration"] == first["iteration"]
    assert f"{1 - first['eos_fraction']:.0%} of the responses" in monitor.warnings[0]["message"]


class Broken(Callback):
    def on_iteration_end(self, trainer, metrics):
        raise KeyError("no such metric")


def test_an_exception_in_a_callback_names_the_callback():
    trainer = make_trainer(None, [Recorder(), Broken()])
    with pytest.raises(KeyError, match="no such metric") as caught:
        trainer.train()
    assert "(raised in callback Broken.on_iteration_end)" in caught.value.__notes__


def test_the_progress_bar_is_a_callback_that_counts_the_iterations(capsys):
    from ppolm.observe.progress import ProgressCallback

    trainer = make_trainer(None, progress=True)
    bars = [cb for cb in trainer.callbacks.callbacks if isinstance(cb, ProgressCallback)]
    assert len(bars) == 1
    trainer.train()
    err = capsys.readouterr().err
    assert "3/3" in err and "reward=" in err and "kl=" in err
    assert bars[0].bar is None                             # closed at the end
    quiet = make_trainer(None)                             # progress=False: no bar
    assert not any(isinstance(cb, ProgressCallback) for cb in quiet.callbacks.callbacks)

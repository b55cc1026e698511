"""Only True from a callback stops training (a truthy dict does not, and says so), and the
health monitor's warnings name the user's line, not ppolm's internals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ppolm import (
    Callback,
    HealthMonitor,
    PPOConfig,
    PPOHealthWarning,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    char_tokenizer,
)
from ppolm.rollout.tasks import make_task


def trainer(callbacks, iterations=3, **settings):
    torch.manual_seed(0)
    task = make_task("continue")
    tok = char_tokenizer(task.alphabet)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=4)
    config = PPOConfig(iterations=iterations, batch_size=8, minibatch_size=4, ppo_epochs=1,
                       progress=False, health_checks=False, **settings)
    return Trainer(TransformerPolicy(len(tok), hidden_size=32), env, config, callbacks=callbacks)


class Returns(Callback):
    def __init__(self, value):
        self.value = value

    def on_iteration_end(self, trainer, metrics):
        return metrics if self.value == "metrics" else self.value


def test_a_callback_returning_the_metrics_does_not_stop_and_is_told_once():
    with pytest.warns(UserWarning, match=r"Returns.on_iteration_end returned a dict.*only True "
                                         r"stops") as caught:
        history = trainer([Returns("metrics")]).train()
    assert len(history) == 3
    assert len([w for w in caught if "on_iteration_end returned" in str(w.message)]) == 1
    assert caught[0].filename == __file__           # the user's train() line


@pytest.mark.parametrize("value", [True, np.True_])
def test_true_stops(value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # True is not warned about
        assert len(trainer([Returns(value)]).train()) == 1


@pytest.mark.parametrize("value", [None, False, np.False_])
def test_none_and_false_go_on(value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(trainer([Returns(value)], iterations=2).train()) == 2


def test_health_warnings_name_the_users_line():
    run = trainer([HealthMonitor(clipfrac_limit=0.0, approx_kl_limit=1e-12)], iterations=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.train()
    health = [w for w in caught if issubclass(w.category, PPOHealthWarning)]
    assert health, "the limits above warn on any run"
    source = Path(__file__).read_text().splitlines()
    for w in health:                         # not callbacks.py's "out.append(...)"
        assert w.filename == __file__ and source[w.lineno - 1].strip() == "run.train()"

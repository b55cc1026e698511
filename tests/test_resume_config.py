"""A setting changed on resume is applied or refused, never silently ignored: the rule
(``ppolm.config.resume``) as pure functions, and the Trainer's resume taking a new learning
rate and refusing a new batch size."""

from __future__ import annotations

import pytest
import yaml

from ppolm import CallableReward, PPOConfig, TextGenerationEnv, Trainer, TransformerPolicy
from ppolm.config.resume import check_resume, resume_changes, run_spec_changes
from ppolm.config.run_spec import RunSpec
from ppolm.errors import ConfigError

SAVED = PPOConfig(iterations=2, batch_size=8, minibatch_size=4)


def changed(**kwargs):
    return resume_changes(SAVED, PPOConfig(**{**SAVED.to_dict(), **kwargs}))


def test_the_same_settings_change_nothing():
    assert changed() == ({}, {})
    # kl_mode None (the estimator's choice) against the choice a checkpoint wrote
    assert resume_changes({**SAVED.to_dict(), "kl_mode": "reward"}, SAVED) == ({}, {})


@pytest.mark.parametrize("kwargs", [
    {"iterations": 5}, {"learning_rate": 0.5}, {"progress": False}, {"device": "cpu"},
    {"engine": "plain"}, {"save_every": 3, "output_dir": "o"}, {"log_samples_every": 0},
])
def test_what_a_resume_may_change_is_applied(kwargs):
    applied, refused = changed(**kwargs)
    assert refused == {} and applied == {k: (getattr(SAVED, k), v) for k, v in kwargs.items()}


@pytest.mark.parametrize("kwargs", [
    {"batch_size": 16}, {"minibatch_size": 8}, {"seed": 1}, {"ppo_epochs": 2},
    {"advantage_estimator": "reinforce_pp"}, {"kl_coef": 0.5}, {"temperature": 0.7},
    {"lr_schedule": "linear"}, {"iterations": 1},
])
def test_what_defines_the_run_is_refused(kwargs):
    applied, refused = changed(**kwargs)
    assert applied == {} and refused == {k: (getattr(SAVED, k), v) for k, v in kwargs.items()}


def test_the_saved_values_may_be_by_section_and_from_an_older_ppolm(tmp_path):
    SAVED.to_yaml(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["algorithm"]["whiten_rewards"]                 # a setting it did not have
    new = PPOConfig(**{**SAVED.to_dict(), "whiten_rewards": True, "seed": 2})
    assert resume_changes(saved, new) == ({}, {"seed": (0, 2)})


def test_one_error_lists_every_refused_setting_with_both_values():
    _, refused = changed(batch_size=16, seed=3, iterations=1)
    with pytest.raises(ConfigError) as err:
        check_resume(refused)
    for words in ("batch_size: 8 -> 16", "seed: 0 -> 3", "iterations: 2 -> 1 (may only grow)",
                  "overwrite=true", "may change iterations"):
        assert words in str(err.value)
    check_resume({})                                      # nothing refused: no error


def test_a_run_spec_compares_the_model_sampling_and_reward_too():
    saved = RunSpec.load(None, []).to_dict()
    new = RunSpec.load(None, ["model.hidden_size=32", "max_new_tokens=8", "eval_every=5",
                              "learning_rate=0.5", "seed=1"]).to_dict()
    applied, refused = run_spec_changes(saved, new)
    assert applied == {"eval_every": (10, 5), "ppo.learning_rate": (0.001, 0.5)}
    assert refused == {"model.hidden_size": (64, 32), "sampling.max_new_tokens": (6, 8),
                       "ppo.seed": (0, 1)}


# --- the Trainer ------------------------------------------------------------------------------
def trainer(tok, out, **kwargs):
    env = TextGenerationEnv(["abc", "hij", "cde", "fgh"], tok,
                            CallableReward(lambda p, r: [x.count("a") / 4 for x in r]),
                            max_new_tokens=4)
    cfg = dict(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=1, progress=False,
               learning_rate=1e-3, output_dir=str(out), health_checks=False)
    return Trainer(TransformerPolicy(len(tok), hidden_size=16, n_layers=1), env,
                   PPOConfig(**{**cfg, **kwargs}))


def test_a_new_learning_rate_takes_effect_after_a_resume(tok, tmp_path):
    trainer(tok, tmp_path).train()
    again = trainer(tok, tmp_path, iterations=3, learning_rate=0.5)
    assert again.resume() == 2
    assert [g["lr"] for g in again.engine.optimizer.param_groups] == [0.5]
    (row,) = again.train()[-1:]
    assert row["iteration"] == 3 and row["lr"] == 0.5


def test_a_new_batch_size_is_refused_before_anything_loads(tok, tmp_path):
    trainer(tok, tmp_path).train()
    again = trainer(tok, tmp_path, iterations=3, batch_size=16, seed=4)
    with pytest.raises(ConfigError, match="batch_size: 8 -> 16; seed: 0 -> 4"):
        again.resume()
    assert again.iteration == 0

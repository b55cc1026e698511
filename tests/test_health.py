"""HealthMonitor on metric sequences: healthy runs are quiet; each sign of trouble warns once per
episode (again after it clears and comes back), with its numbers; unknown metrics change
nothing. The trainer is a holder of a real PPOConfig (the monitor reads only ``.config``)."""

from __future__ import annotations

import json
import math
import types
import warnings

import pytest

from ppolm import PPOConfig
from ppolm.errors import ConfigError
from ppolm.observe.health import CONDITIONS, HealthMonitor, PPOHealthWarning

HEALTHY = {"kl": 0.5, "kl_coef": 0.05, "entropy": 1.2, "clipfrac": 0.05, "approx_kl": 0.01,
           "explained_variance": 0.3, "eos_fraction": 0.9, "skipped_updates": 0.0,
           "reward_mean": 0.1}


def holder(**settings):
    """What the monitor reads of a Trainer: its config."""
    return types.SimpleNamespace(config=PPOConfig(progress=False, **settings))


def rows(*changes):
    """Metric rows, iterations 1, 2, ...: HEALTHY updated with each dict of ``changes``."""
    return [{**HEALTHY, **change, "iteration": i} for i, change in enumerate(changes, 1)]


def feed(monitor, trainer, metrics):
    """Run the monitor over the rows; return the PPOHealthWarnings issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for row in metrics:
            assert monitor.on_iteration_end(trainer, row) is None      # never stops training
    return [w for w in caught if issubclass(w.category, PPOHealthWarning)]


def test_a_healthy_run_is_quiet():
    monitor = HealthMonitor()
    # KL wandering about a low level, entropy falling slowly, early negative explained variance
    metrics = rows(*[{"kl": 0.3 + 0.1 * math.sin(i), "entropy": 1.2 - 0.02 * i,
                      "explained_variance": -0.5 if i < 3 else 0.4} for i in range(30)])
    assert feed(monitor, holder(adaptive_kl=True), metrics) == []
    assert monitor.warnings == []


def test_the_usual_climb_of_the_kl_from_zero_is_not_a_rise_to_warn_about():
    metrics = rows(*[{"kl": 0.01 * i} for i in range(12)])       # rising, far below the target
    assert feed(HealthMonitor(), holder(adaptive_kl=True), metrics) == []
    # ... unless every rise counts
    found = feed(HealthMonitor(kl_rising_floor=0.0), holder(adaptive_kl=True), metrics)
    assert [w.message.args[0].split()[0] for w in found] == ["KL"]


def test_a_critic_free_run_without_explained_variance_is_quiet():
    metrics = [{k: v for k, v in row.items() if k != "explained_variance"}
               for row in rows(*[{}] * 10)]
    critic_free = holder(advantage_estimator="grpo", kl_mode="loss", samples_per_prompt=2)
    assert feed(HealthMonitor(value_iterations=1), critic_free, metrics) == []


# condition name, a bad change of the metrics, config settings, numbers the message must show
CASES = [
    ("kl_high", {"kl": 14.2, "kl_coef": 0.12}, {"adaptive_kl": True}, ["14.2", "6", "0.12"]),
    ("kl_high", {"kl": 25.0}, {}, ["25", "10", "0.05"]),
    ("kl_negative", {"kl": -0.35}, {}, ["-0.35", "-0.1"]),
    ("entropy_collapse", {"entropy": 0.05}, {}, ["0.05", "1.2", "10%"]),
    ("clipfrac_high", {"clipfrac": 0.42}, {}, ["0.42", "0.3"]),
    ("approx_kl_high", {"approx_kl": 0.25}, {}, ["0.25", "0.1", "set target_approx_kl"]),
    ("approx_kl_high", {"approx_kl": 0.25}, {"target_approx_kl": 0.2}, ["0.25", "now 0.2"]),
    ("truncated", {"eos_fraction": 0.125}, {}, ["88%", "80%", "max_new_tokens"]),
    ("skipped_updates", {"skipped_updates": 2.0, "epochs_done": 2.0}, {},
     ["2 of 8 updates", "max_bad_updates=5"]),
    # multi-turn runs (HEALTHY_TURNS below is their fine state)
    ("episodes_truncated", {"truncated_fraction": 0.75}, {}, ["75%", "50%", "max_turns"]),
    ("tool_errors", {"tool_errors_mean": 2.5}, {}, ["2.5", "over 1", "samples.jsonl"]),
]
HEALTHY_TURNS = {"turns_mean": 2.0, "truncated_fraction": 0.25, "tool_errors_mean": 0.5}


@pytest.mark.parametrize("name,bad,settings,numbers", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_condition_warns_once_per_episode(name, bad, settings, numbers):
    monitor = HealthMonitor()
    # fine, fine, bad x3 (one episode), fine, bad x2 (a second episode), fine
    fine = HEALTHY_TURNS if name in ("episodes_truncated", "tool_errors") else {}
    metrics = rows(fine, fine, bad, bad, bad, fine, bad, bad, fine)
    found = feed(monitor, holder(**settings), metrics)
    assert [w["name"] for w in monitor.warnings] == [name, name]
    assert [w["iteration"] for w in monitor.warnings] == [3, 7]
    assert [str(w.message) for w in found] == [w["message"] for w in monitor.warnings]
    message = monitor.warnings[0]["message"]
    assert "iteration 3" in message and monitor.warnings[1]["message"].count("iteration 7")
    for number in numbers:
        assert number in message, (number, message)


def test_a_kl_that_keeps_rising_warns_once_per_streak():
    # adaptive target 6 nats: rises over 3 nats count; 5 in a row warn (iteration 6), the 6th
    # is the same episode; a fall ends it; 5 more rises warn again (iteration 13).
    kls = [3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5]
    monitor = HealthMonitor()
    found = feed(monitor, holder(adaptive_kl=True), rows(*[{"kl": k} for k in kls]))
    assert [(w["name"], w["iteration"]) for w in monitor.warnings] == [("kl_rising", 6),
                                                                      ("kl_rising", 13)]
    assert len(found) == 2
    assert "5 iterations in a row" in monitor.warnings[0]["message"]
    assert "6 nats at iteration 6" in monitor.warnings[0]["message"]
    assert "8.5 nats at iteration 13" in monitor.warnings[1]["message"]


def test_kl_high_uses_the_kl_limit_without_adaptive_kl():
    metrics = rows({"kl": 15.0}, {"kl": 7.0})
    assert feed(HealthMonitor(), holder(), metrics) == []                    # 15 <= 2 x 10
    found = feed(HealthMonitor(kl_limit=5.0), holder(), metrics)             # 15 > 2 x 5
    assert len(found) == 1 and "15 nats" in str(found[0].message)
    found = feed(HealthMonitor(), holder(adaptive_kl=True, kl_target=6.0), metrics)
    assert [w.message.args[0][:20] for w in found] == ["KL to the reference "]   # 15 > 2 x 6


def test_explained_variance_below_zero_warns_after_n_iterations():
    evs = [-0.2] * 4 + [0.1] + [-0.3] * 5 + [-0.4] + [0.2] + [-0.1] * 5
    monitor = HealthMonitor()
    feed(monitor, holder(), rows(*[{"explained_variance": e} for e in evs]))
    assert [(w["name"], w["iteration"]) for w in monitor.warnings] == [
        ("value_not_learning", 10), ("value_not_learning", 17)]
    assert "below 0 for 5 iterations (-0.3 at iteration 10)" in monitor.warnings[0]["message"]


def test_a_missing_or_non_finite_metric_changes_nothing():
    monitor = HealthMonitor()
    metrics = rows({"clipfrac": 0.5}, {"clipfrac": math.nan}, {"clipfrac": 0.5},
                   {"clipfrac": None}, {"clipfrac": 0.5})
    assert len(feed(monitor, holder(), metrics)) == 1                 # one episode throughout
    bare = [{"iteration": i} for i in range(1, 4)]
    assert feed(HealthMonitor(), holder(), bare) == []


def test_several_conditions_at_once_each_warn():
    monitor = HealthMonitor()
    found = feed(monitor, holder(), rows({}, {"clipfrac": 0.5, "approx_kl": 0.3,
                                              "skipped_updates": 1.0}))
    assert sorted(w["name"] for w in monitor.warnings) == ["approx_kl_high", "clipfrac_high",
                                                           "skipped_updates"]
    assert len(found) == 3 and set(CONDITIONS) >= {w["name"] for w in monitor.warnings}


def test_pytest_warns_with_the_numbers():
    monitor = HealthMonitor()
    with pytest.warns(PPOHealthWarning, match=r"KL to the reference is 14\.2 nats at "
                                              r"iteration 12, over 2x its target"):
        monitor.on_iteration_end(holder(adaptive_kl=True), {**HEALTHY, "kl": 14.2,
                                                            "iteration": 12})
    assert monitor.warnings[0]["iteration"] == 12 and monitor.warnings[0]["name"] == "kl_high"


def test_entropy_collapse_compares_with_the_first_iteration_seen():
    monitor = HealthMonitor(entropy_fraction=0.5)
    feed(monitor, holder(), rows({"entropy": 2.0}, {"entropy": 1.1}, {"entropy": 0.9}))
    assert [(w["name"], w["iteration"]) for w in monitor.warnings] == [("entropy_collapse", 3)]
    assert "50% of its first value (2)" in monitor.warnings[0]["message"]


@pytest.mark.parametrize("kwargs", [{"kl_factor": 0}, {"kl_limit": -1.0},
                                    {"kl_rising_iterations": 0}, {"value_iterations": 2.5},
                                    {"entropy_fraction": 1.5}, {"clipfrac_limit": -0.1},
                                    {"truncated_fraction": 2}, {"negative_kl": 0.1},
                                    {"approx_kl_limit": 0}, {"truncated_episodes": 1.5},
                                    {"tool_errors_limit": -1}])
def test_bad_thresholds_are_refused(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        HealthMonitor(**kwargs)


def evaluated(scores, held_out, every=2):
    """Rows whose training score_mean follows ``scores``; every ``every``-th row also carries
    the held-out score (``eval/score_mean``), taken in turn from ``held_out``."""
    out, evals = [], iter(held_out)
    for i, score in enumerate(scores, 1):
        row = {**HEALTHY, "score_mean": score, "iteration": i}
        if i % every == 0:
            row["eval/score_mean"] = next(evals)
        out.append(row)
    return out


def test_the_training_score_rising_while_the_held_out_score_falls_warns():
    # evaluations at 2, 4, 6, 8: training score means 0.15, 0.35, 0.55, 0.75 rise; held out
    # 0.5, 0.4, 0.3 from the second on: two falling intervals at iteration 6
    metrics = evaluated([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.5, 0.4, 0.3, 0.2])
    monitor = HealthMonitor()
    found = feed(monitor, holder(), metrics)
    assert [(w["name"], w["iteration"]) for w in monitor.warnings] == [("reward_hacking", 6)]
    assert len(found) == 1
    message = monitor.warnings[0]["message"]
    for number in ("0.15 to 0.55", "iterations 2 to 6", "0.5 to 0.3", "keep_best"):
        assert number in message, (number, message)


@pytest.mark.parametrize("scores,held_out", [
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.4]),    # both rise
    ([0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [0.5, 0.4, 0.3, 0.2]),    # both fall
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.5, 0.4, 0.45, 0.3]),   # one fall at a time
    ([0.1, 0.2, 0.3, 0.4], [0.5, 0.4]),                                  # one interval only
])
def test_no_hacking_warning_unless_the_scores_part_for_n_evaluations(scores, held_out):
    monitor = HealthMonitor()
    assert feed(monitor, holder(), evaluated(scores, held_out)) == []


def test_without_evaluation_the_hacking_check_is_silent():
    metrics = rows(*[{"score_mean": 0.1 * i} for i in range(20)])
    assert feed(HealthMonitor(hacking_evals=1), holder(), metrics) == []


def test_warnings_go_to_warnings_jsonl_and_a_resume_cuts_them_back(tmp_path):
    trainer = types.SimpleNamespace(config=PPOConfig(progress=False), output_dir=tmp_path,
                                    iteration=0)
    monitor = HealthMonitor()
    monitor.on_train_begin(trainer)
    feed(monitor, trainer, rows({"clipfrac": 0.5}, {}, {"clipfrac": 0.5}))
    lines = (tmp_path / "warnings.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == monitor.warnings
    assert [w["iteration"] for w in monitor.warnings] == [1, 3]
    trainer.iteration = 2                      # resumed from a checkpoint at iteration 2
    HealthMonitor().on_train_begin(trainer)
    assert [json.loads(line)["iteration"]
            for line in (tmp_path / "warnings.jsonl").read_text().splitlines()] == [1]

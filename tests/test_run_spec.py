"""The run spec (a run's YAML): the sampling settings in one section and checked in one place,
settings at their old place with a DeprecationWarning, paths read from the file's folder, the
value head of each estimator, a reward module found beside the file, and each estimator run
from YAML."""

from __future__ import annotations

import math
import warnings

import pytest

from ppolm import PPOConfig, TextGenerationEnv
from ppolm.config.run_spec import RunSpec
from ppolm.config.sampling import SamplingConfig
from ppolm.errors import ConfigError, DataError
from ppolm.run import build_run, load_reward

TINY = ["iterations=1", "batch_size=8", "minibatch_size=4", "ppo_epochs=1", "progress=false",
        "model.hidden_size=16", "model.n_layers=1", "max_new_tokens=3"]


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_quietly(path, overrides=()):
    """RunSpec.load, failing on any DeprecationWarning (the new places warn about nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return RunSpec.load(path, list(overrides))


# --- sampling: one section, one check ------------------------------------------------------
def test_the_sampling_section_holds_all_six_and_hands_them_to_their_owners(tmp_path):
    cfg = write(tmp_path / "run.yaml", "sampling: {max_new_tokens: 5, top_k: 3, top_p: 0.9, "
                "stop_token_ids: [1], temperature: 0.7, samples_per_prompt: 2}\n")
    spec = load_quietly(cfg)
    assert spec.sampling == SamplingConfig(5, 3, 0.9, [1], 0.7, 2)
    assert (spec.ppo.temperature, spec.ppo.samples_per_prompt) == (0.7, 2)
    assert spec.sampling.env_values() == {"max_new_tokens": 5, "top_k": 3, "top_p": 0.9,
                                          "stop_token_ids": [1]}
    # a bare name means the sampling setting; the spec writes each setting once
    over = load_quietly(cfg, ["max_new_tokens=8", "temperature=0.5", "sampling.top_p=0.8"])
    assert (over.sampling.max_new_tokens, over.ppo.temperature, over.sampling.top_p) == (
        8, 0.5, 0.8)
    saved = over.to_dict()
    assert "temperature" not in saved["ppo"] and saved["sampling"]["temperature"] == 0.5
    assert RunSpec.from_dict(saved) == over
    env = build_run(RunSpec.load(cfg, TINY)).env
    assert (env.max_new_tokens, env.top_k, env.top_p, env.stop_token_ids) == (3, 3, 0.9, [1])


@pytest.mark.parametrize(("name", "value", "words"), [
    ("top_p", 0.0, "top_p=0.0 must be in \\(0, 1\\]"),
    ("top_k", -1, "top_k=-1 must be an int >= 0"),
    ("max_new_tokens", 0, "max_new_tokens=0 must be an int > 0"),
    ("stop_token_ids", [-1], "stop_token_ids=\\[-1\\]: \\[-1\\] are not token ids"),
])
def test_a_sampling_setting_is_checked_with_the_same_words_wherever_it_is_given(
        tok, name, value, words):
    with pytest.raises(ConfigError, match=f"sampling.{words}"):
        SamplingConfig(**{name: value})
    with pytest.raises(ConfigError, match=f"sampling.{words}"):
        RunSpec.load(None, [f"sampling.{name}={value}"])
    with pytest.raises(DataError, match=words):           # the environment's own argument
        TextGenerationEnv(["ab"], tok, lambda p, r: [0.0] * len(r), **{name: value})


def test_the_temperature_and_samples_per_prompt_are_checked_by_the_same_function():
    for kwargs, words in (({"temperature": 0}, "temperature=0 must be > 0"),
                          ({"samples_per_prompt": 0}, "samples_per_prompt=0 must be an int >= 1")):
        with pytest.raises(ConfigError, match=words):
            PPOConfig(**kwargs)
        with pytest.raises(ConfigError, match=f"sampling.{words}"):
            SamplingConfig(**kwargs)


# --- settings that moved --------------------------------------------------------------------
@pytest.mark.parametrize(("text", "overrides", "old"), [
    ("env: {max_new_tokens: 5}\n", [], "env.max_new_tokens"),
    ("env: {top_k: 5}\n", [], "env.top_k"),
    ("ppo: {temperature: 0.5}\n", [], "ppo.temperature"),
    ("ppo: {algorithm: {samples_per_prompt: 2}}\n", [], "ppo.samples_per_prompt"),
    ("", ["env.top_p=0.5"], "env.top_p"),
    ("", ["ppo.temperature=0.5"], "ppo.temperature"),
    ("", ["ppo.algorithm.samples_per_prompt=2"], "ppo.samples_per_prompt"),
])
def test_a_setting_at_its_old_place_still_works_with_a_deprecation_warning(
        tmp_path, text, overrides, old):
    cfg = write(tmp_path / "run.yaml", text)
    with pytest.warns(DeprecationWarning, match=f"{old} .*is now sampling"):
        spec = RunSpec.load(cfg, overrides)
    name = old.split(".")[1]
    assert getattr(spec.sampling, name) != getattr(SamplingConfig(), name)
    if name in ("temperature", "samples_per_prompt"):
        assert getattr(spec.ppo, name) == getattr(spec.sampling, name)


def test_from_dict_moves_old_places_too_and_refuses_two_different_values():
    with pytest.warns(DeprecationWarning, match="env.max_new_tokens"):
        assert RunSpec.from_dict({"env": {"max_new_tokens": 4}}).sampling.max_new_tokens == 4
    with pytest.raises(ConfigError, match="env.top_k=2 and sampling.top_k=3.*give it once"):
        RunSpec.from_dict({"env": {"top_k": 2}, "sampling": {"top_k": 3}})
    # a command-line override of the new place replaces a file's old place
    with pytest.warns(DeprecationWarning):
        spec = RunSpec.load(None, ["env.max_new_tokens=4", "max_new_tokens=9"])
    assert spec.sampling.max_new_tokens == 9
    with pytest.raises(ConfigError, match="give it once, in sampling"):
        RunSpec(ppo=PPOConfig(temperature=0.5))
    # read from Python at the old place: the value, with a warning
    with pytest.warns(DeprecationWarning, match="env.top_p .*is now sampling.top_p"):
        assert RunSpec.load(None, ["top_p=0.5"]).env.top_p == 0.5


# --- paths in a YAML file: its folder's ---------------------------------------------------
def test_relative_paths_in_a_yaml_file_are_read_from_its_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    write(conf / "p.txt", "ab\ncd\n")
    cfg = write(conf / "run.yaml", "task: null\nprompts: p.txt\nreward: sentiment\n"
                "eval_prompts: p.txt\nmodel: {kind: hf, path: no_such_model}\n"
                "ppo: {output_dir: out}\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = RunSpec.load("../conf/run.yaml", [])
    assert spec.prompts == spec.eval_prompts == str(conf / "p.txt").replace(
        str(tmp_path), "..")
    assert spec.model.path == "no_such_model"      # not beside the file: as given (a Hub id)
    assert spec.ppo.output_dir == "../conf/out"
    # given on the command line: the current folder's
    over = RunSpec.load(cfg, ["output_dir=mine", "prompts=q.txt"])
    assert (over.ppo.output_dir, over.prompts) == ("mine", "q.txt")


# --- the value head of each estimator -----------------------------------------------------
CRITIC_FREE = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]


@pytest.mark.parametrize("value", ["none", "null", "auto"])
def test_a_critic_free_estimator_builds_no_value_head(value):
    spec = RunSpec.load(None, ["advantage_estimator=grpo", "samples_per_prompt=4",
                               f"model.value={value}"])
    assert spec.value_head() is None


def test_the_value_head_and_the_estimator_must_agree():
    assert RunSpec.load(None, []).value_head() == "shared"             # auto, gae
    assert RunSpec.load(None, ["model.value=detached"]).value_head() == "detached"
    with pytest.raises(ConfigError, match="model.value=none builds no value head.*'gae'"):
        RunSpec.load(None, ["model.value=none"])
    with pytest.raises(ConfigError, match="model.value=separate builds a critic.*'rloo'"):
        RunSpec.load(None, ["advantage_estimator=rloo", "samples_per_prompt=2",
                            "model.value=separate"])
    with pytest.raises(ConfigError, match="model.value='nonee' is not a choice: use one of "
                                          "'auto'"):
        RunSpec.load(None, ["model.value=nonee"])


@pytest.mark.parametrize("estimator", ["gae", *CRITIC_FREE])
def test_each_estimator_runs_from_a_yaml_file(tmp_path, estimator):
    cfg = write(tmp_path / "run.yaml", f"ppo: {{advantage_estimator: {estimator}}}\n"
                "sampling: {samples_per_prompt: 4}\n")
    trainer = build_run(load_quietly(cfg, TINY))
    assert (trainer.value_head is None) == (estimator != "gae")
    (row,) = trainer.train()
    assert math.isfinite(row["policy_loss"]) and math.isfinite(row["score_mean"])


# --- a reward module beside the file -------------------------------------------------------
REWARD = ("from ppolm import RewardFunction\n"
          "class Short(RewardFunction):\n"
          "    def __call__(self, prompts, responses):\n"
          "        return [-float(len(r)) for r in responses]\n")


def test_a_reward_module_is_found_in_the_config_folder_then_the_current_one(
        tmp_path, monkeypatch):
    write(tmp_path / "conf" / "beside_the_file.py", REWARD)
    write(tmp_path / "cwd" / "in_the_cwd.py", REWARD)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    assert load_reward("beside_the_file:Short", {}, tmp_path / "conf")(["a"], ["xy"]) == [-2.0]
    assert load_reward("in_the_cwd:Short", {}, tmp_path / "conf")(["a"], ["xyz"]) == [-3.0]
    with pytest.raises(ConfigError, match=f"looked in {tmp_path / 'conf'}, "
                                          f"{tmp_path / 'cwd'} and the installed packages"):
        load_reward("nowhere_to_be_found:Short", {}, tmp_path / "conf")

"""PPOConfig: validation, its three sections in YAML and overrides, and the same defaults
from Python, from a YAML file and from the command line's run file."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ppolm import PPOConfig
from ppolm.config.ppo import SECTIONS, AlgorithmConfig, RunConfig, SystemConfig
from ppolm.errors import ConfigError, PPOLMError
from ppolm.run import DEMO, RunSpec


def names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def test_defaults_and_derived_sizes():
    c = PPOConfig(batch_size=32, minibatch_size=8, micro_batch_size=4)
    assert c.num_minibatches == 4 and c.grad_accum_steps == 2
    assert PPOConfig().grad_accum_steps == 1
    assert PPOConfig(micro_batch_size=4).override(["minibatch_size=4"]).grad_accum_steps == 1
    d = PPOConfig()
    # from Python no file is written unless asked; the engine follows the device
    assert d.output_dir is None and d.save_every == 0 and d.engine == "auto"
    assert d.keep_freed_memory is False


@pytest.mark.parametrize("kwargs,words", [
    ({"learning_rate": -1.0}, "learning_rate=-1.0"),
    ({"minibatch_size": 64, "batch_size": 32}, "larger than batch_size"),
    ({"batch_size": 30, "minibatch_size": 8}, "not divisible"),
    ({"minibatch_size": 8, "micro_batch_size": 3}, "micro_batch_size=3"),
    ({"clip_range": 0.0}, "clip_range=0.0"),
    ({"gamma": 1.5}, "gamma=1.5"),
    ({"lam": -0.1}, "lam=-0.1"),
    ({"temperature": 0}, "temperature=0"),
    ({"kl_mode": "both"}, "kl_mode='both'"),
    ({"batch_size": "32"}, "wrong type"),
    ({"iterations": 2.5}, "iterations=2.5"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"kl_estimator": "full", "kl_mode": "reward"}, "needs kl_mode='loss'"),
    ({"warmup_steps": -1}, "warmup_steps=-1"),
])
def test_bad_values_name_the_field(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", "\\(")) as err:
        PPOConfig(**kwargs)
    assert isinstance(err.value, PPOLMError)


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        PPOConfig.from_dict({"learnig_rate": 1e-4})


def test_yaml_round_trip_and_overrides(tmp_path):
    c = PPOConfig(iterations=7, kl_mode="loss", max_grad_norm=None)
    c.to_yaml(tmp_path / "c.yaml")
    back = PPOConfig.from_yaml(tmp_path / "c.yaml")
    assert back == c
    over = back.override(["learning_rate=1e-4", "kl_estimator=k3", "target_approx_kl=0.02"])
    assert (over.learning_rate, over.kl_estimator, over.target_approx_kl) == (1e-4, "k3", 0.02)
    with pytest.raises(ConfigError, match="key=value"):
        back.override(["learning_rate"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        PPOConfig.from_yaml(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        PPOConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        PPOConfig.from_yaml(tmp_path / "broken.yaml")


def test_to_yaml_writes_the_three_sections(tmp_path):
    c = PPOConfig(iterations=7, engine="plain", output_dir="out", kl_coef=0.2)
    c.to_yaml(tmp_path / "c.yaml")
    raw = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert list(raw) == ["algorithm", "system", "run"] == list(SECTIONS)
    assert list(raw["algorithm"]) == names(AlgorithmConfig)
    assert list(raw["system"]) == names(SystemConfig)
    assert list(raw["run"]) == names(RunConfig)
    assert raw["algorithm"]["iterations"] == 7 and raw["algorithm"]["kl_coef"] == 0.2
    assert raw["system"]["engine"] == "plain" and "cpu_bf16" in raw["system"]
    assert raw["run"]["output_dir"] == "out"
    # every settable field once, in exactly one section; derived sizes are not written
    flat = {k: v for section in raw.values() for k, v in section.items()}
    assert sum(len(section) for section in raw.values()) == len(flat)
    assert flat == c.to_dict() and "num_minibatches" not in flat
    assert c.to_sections() == raw


def test_from_yaml_reads_sections_and_flat_keys(tmp_path):
    want = PPOConfig(kl_coef=0.2, engine="plain", output_dir="o", iterations=3)
    (tmp_path / "sections.yaml").write_text("algorithm: {kl_coef: 0.2, iterations: 3}\n"
                                            "system: {engine: plain}\nrun: {output_dir: o}\n")
    (tmp_path / "flat.yaml").write_text("kl_coef: 0.2\niterations: 3\nengine: plain\n"
                                        "output_dir: o\n")
    (tmp_path / "mixed.yaml").write_text("system: {engine: plain}\nkl_coef: 0.2\niterations: 3\n"
                                         "output_dir: o\n")
    for name in ("sections", "flat", "mixed"):
        assert PPOConfig.from_yaml(tmp_path / f"{name}.yaml") == want, name


@pytest.mark.parametrize("text,words", [
    ("system: {kl_coef: 0.1}\n", "Unknown key 'kl_coef' in PPOConfig section 'system'"),
    ("algorithm: {engine: plain}\n", "Unknown key 'engine' in PPOConfig section 'algorithm'"),
    ("run: {learning_rate: 0.1}\n", "Unknown key 'learning_rate' in PPOConfig section 'run'"),
])
def test_a_key_in_the_wrong_section_is_refused(tmp_path, text, words):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=words):
        PPOConfig.from_yaml(tmp_path / "c.yaml")


def test_override_with_or_without_the_section():
    c = PPOConfig()
    assert c.override(["system.engine=plain"]).engine == "plain"
    assert c.override(["engine=plain"]).engine == "plain"
    both = c.override(["algorithm.kl_coef=0.3", "run.output_dir=x", "seed=4"])
    assert (both.kl_coef, both.output_dir, both.seed) == (0.3, "x", 4)
    with pytest.raises(ConfigError, match="Unknown key 'kl_coef' in section 'system'"):
        c.override(["system.kl_coef=0.1"])
    with pytest.raises(ConfigError, match="Unknown section 'sytem'"):
        c.override(["sytem.engine=plain"])
    with pytest.raises(ConfigError, match="engine='gpu'"):
        c.override(["system.engine=gpu"])


def test_the_same_defaults_from_python_yaml_and_the_command_line(tmp_path):
    (tmp_path / "almost_empty.yaml").write_text("run: {progress: false}\n")
    from_yaml = PPOConfig.from_yaml(tmp_path / "almost_empty.yaml")
    (tmp_path / "run.yaml").write_text("task: continue\nppo: {iterations: 3, batch_size: 8, "
                                       "minibatch_size: 4}\n")
    from_cli = RunSpec.load(tmp_path / "run.yaml", []).ppo
    assert PPOConfig().kl_coef == from_yaml.kl_coef == from_cli.kl_coef
    # not only kl_coef: every field the files leave open takes PPOConfig's default
    assert from_yaml == PPOConfig(progress=False)
    assert from_cli == PPOConfig(iterations=3, batch_size=8, minibatch_size=4)
    # a run file may give its ppo settings in sections too
    (tmp_path / "sections.yaml").write_text("ppo: {algorithm: {iterations: 3, batch_size: 8, "
                                            "minibatch_size: 4}}\n")
    assert RunSpec.load(tmp_path / "sections.yaml", []).ppo == from_cli


def test_the_demo_run_sets_its_kl_coef_explicitly():
    raw = yaml.safe_load(DEMO.read_text())
    assert raw["ppo"]["kl_coef"] == 0.01            # written in the file, not a hidden default
    demo = RunSpec.load(None, [])
    assert demo.ppo.kl_coef == 0.01 != PPOConfig().kl_coef
    # and every ppo setting the file does not write is PPOConfig's default
    defaults = PPOConfig().to_dict()
    for key, value in demo.ppo.to_dict().items():
        assert value == raw["ppo"].get(key, defaults[key]), key
    assert RunSpec.load(None, ["kl_coef=0.5"]).ppo.kl_coef == 0.5
    assert RunSpec.load(None, ["ppo.system.engine=plain"]).ppo.engine == "plain"


@pytest.mark.parametrize("kwargs,words", [
    ({"engine": "plain", "compile": True}, "compile set, but only engine='fast_cpu'"),
    ({"engine": "plain", "cpu_bf16": True, "keep_freed_memory": True},
     "cpu_bf16, keep_freed_memory set"),
    ({"save_every": 2}, "save_every=2 needs an output_dir"),
    ({"engine": "fast"}, "engine='fast'"),
])
def test_settings_that_would_be_ignored_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        PPOConfig(**kwargs)


def test_fast_settings_with_the_fast_or_auto_engine_and_save_every_with_an_output_dir():
    assert PPOConfig(engine="fast_cpu", compile=True).compile
    assert PPOConfig(engine="auto", keep_freed_memory=True).keep_freed_memory
    assert PPOConfig(save_every=2, output_dir="out").save_every == 2


# --- issue 34 ------------------------------------------------------------------------------
def readme_grpo_line() -> str:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    found = re.search(r'`(PPOConfig\(samples_per_prompt=4, advantage_estimator="grpo"\))`',
                      readme)
    assert found, "the README's GRPO line moved: update this test"
    return found.group(1)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_the_readme_grpo_line_runs_as_written(tok, estimator):
    from ppolm import CallableReward, TextGenerationEnv, Trainer, TransformerPolicy

    config = eval(readme_grpo_line().replace('"grpo"', repr(estimator)), {"PPOConfig": PPOConfig})
    assert config.kl_mode == "loss"                      # the estimator's natural choice
    env = TextGenerationEnv(["abc", "hij", "cde", "fgh"], tok,
                            CallableReward(lambda p, r: [x.count("a") / 4 for x in r]),
                            max_new_tokens=4)
    trainer = Trainer(TransformerPolicy(len(tok), hidden_size=16, n_layers=1), env, config)
    row = trainer.iterate()
    assert trainer.value_head is None and row["kl_coef"] == config.kl_coef


def test_kl_mode_defaults_to_the_estimators_choice_and_an_explicit_one_is_kept():
    assert PPOConfig().kl_mode == "reward"
    assert PPOConfig(advantage_estimator="reinforce_pp").kl_mode == "reward"
    assert PPOConfig(kl_estimator="full").kl_mode == "loss"
    assert PPOConfig(samples_per_prompt=2, advantage_estimator="grpo", kl_coef=0).override(
        ["kl_mode=reward"]).kl_mode == "reward"                # no KL: nothing ignored
    with pytest.raises(ConfigError, match="set kl_mode=loss or leave it unset"):
        PPOConfig(samples_per_prompt=2, advantage_estimator="rloo", kl_mode="reward")
    # written as given, so a copy with another estimator chooses again
    grpo = PPOConfig(samples_per_prompt=2, batch_size=8, minibatch_size=4,
                     advantage_estimator="grpo")
    assert grpo.to_dict()["kl_mode"] is None and grpo.to_sections()["algorithm"]["kl_mode"] is None
    assert grpo.override(["advantage_estimator=gae"]).kl_mode == "reward"
    assert PPOConfig.from_dict(grpo.to_dict()) == grpo


def test_a_misspelled_keyword_names_the_closest_field():
    import inspect

    with pytest.raises(ConfigError, match="Unknown key 'learnig_rate' in PPOConfig. Did you "
                                          "mean 'learning_rate'?"):
        PPOConfig(learnig_rate=1e-4)
    # still a dataclass: its signature, replace, copies
    assert "learning_rate" in inspect.signature(PPOConfig).parameters
    assert dataclasses.replace(PPOConfig(), iterations=3).iterations == 3


def test_report_to_may_be_one_name():
    assert PPOConfig(report_to="none").report_to == ["none"]
    pytest.importorskip("tensorboard")
    assert PPOConfig(report_to="tensorboard", output_dir="o").report_to == ["tensorboard"]
    assert PPOConfig().override(["report_to=tensorboard", "output_dir=o"]).report_to == [
        "tensorboard"]


def test_fast_cpu_switches_are_refused_in_one_place_whoever_picks_the_engine():
    import torch

    from ppolm.engines.factory import make_engine

    # 'auto' with gradient checkpointing picks the plain engine on a CPU: refused there
    config = PPOConfig(gradient_checkpointing=True, compile=True)
    with pytest.raises(ConfigError, match="compile set, but only engine='fast_cpu' reads it; "
                                          "this run's engine on cpu, 'plain', would ignore"):
        make_engine(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="compile set, but only engine='fast_cpu' reads it; "
                                          "engine='plain' would ignore"):
        PPOConfig(engine="plain", compile=True)


def test_the_sections_group_the_settings_by_what_they_are():
    """Each setting under the header that names it (the field order is the YAML's)."""
    from pathlib import Path

    import ppolm.config.sections as sections

    headers, header = {}, ""
    for line in Path(sections.__file__).read_text().splitlines():
        name = line.split(":")[0].strip()
        if line.startswith("class "):
            header = ""
        elif line.startswith("    # --- "):
            header = line.strip("# -")
        elif line.startswith("    ") and not line.startswith("     ") and name.isidentifier():
            headers[name] = header
    assert headers["temperature"] == headers["samples_per_prompt"] == "sampling"
    assert headers["loss_aggregation"] == headers["clip_range"] == "losses"
    assert headers["advantage_estimator"] == headers["lam"] == "advantages"
    assert headers["average_last"] == "the weights training ends with"

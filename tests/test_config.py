from __future__ import annotations

import pytest

from ppolm import PPOConfig
from ppolm.errors import ConfigError, PPOLMError


def test_defaults_and_derived_sizes():
    c = PPOConfig(batch_size=32, minibatch_size=8, micro_batch_size=4)
    assert c.num_minibatches == 4 and c.grad_accum_steps == 2
    assert PPOConfig().grad_accum_steps == 1
    assert PPOConfig(micro_batch_size=4).override(["minibatch_size=4"]).grad_accum_steps == 1


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
    ({"kl_estimator": "full"}, "needs kl_mode='loss'"),
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

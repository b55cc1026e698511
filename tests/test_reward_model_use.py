"""A saved reward model as PPO's reward (Python and YAML, normalised by default) and as the
start of a separate critic."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import ALPHABET, tiny_llama
from ppolm import ConfigError, HFPolicy, RewardError, ValueHead, char_tokenizer
from ppolm.config.reward_model import RewardModelConfig
from ppolm.policies.reward_model import NORMALIZATION_FILE, load_reward_model
from ppolm.reward_modeling.trainer import RewardModelTrainer
from ppolm.rollout.learned_reward import RewardModelReward
from ppolm.run import RunSpec, build_run
from test_reward_model_trainer import preference_rows

PROMPTS = ["ab", "jc", "ddd"]
RESPONSES = ["aaaa", "b", "cgh"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny causal LM folder (the policy's base) and a reward model trained from it (once
    for the module; a test that changes the folder copies it)."""
    tmp_path = tmp_path_factory.mktemp("reward_model")
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    base = tiny_llama(len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = RewardModelConfig(steps=2, batch_size=8, learning_rate=1e-2, progress=False)
    t = RewardModelTrainer(tmp_path / "base", tok, preference_rows(16), cfg)
    t.train()
    t.save_model(tmp_path / "rm")
    return tmp_path / "base", tmp_path / "rm"


def test_the_reward_is_the_normalised_score_of_prompt_plus_response(folders):
    _, rm = folders
    model, tok, norm = load_reward_model(rm)
    assert norm is not None
    rows = [tok(p + r)["input_ids"] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    with torch.no_grad():
        raw = torch.cat([model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))
                         for x in rows])
    got = RewardModelReward(rm)(PROMPTS, RESPONSES)
    assert got == pytest.approx(((raw - norm.mean) / norm.std).tolist(), abs=1e-5)
    assert RewardModelReward(rm, normalize=False)(PROMPTS, RESPONSES) == pytest.approx(
        raw.tolist(), abs=1e-5)


def test_without_a_normalisation_the_default_is_refused(folders, tmp_path):
    import shutil

    rm = shutil.copytree(folders[1], tmp_path / "rm")
    (rm / NORMALIZATION_FILE).unlink()
    with pytest.raises(RewardError, match="normalize=False"):
        RewardModelReward(rm)


def test_yaml_reward_model_and_critic_from_it(folders):
    base, rm = folders
    tmp_path = rm.parent                 # relative paths in the YAML file: read from its folder
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = {"model": {"kind": "hf", "path": "base", "value": "separate", "value_from": "rm"},
              "prompts": "prompts.txt", "reward": {"model": "rm"}, "task": None,
              "sampling": {"max_new_tokens": 3},
              "ppo": {"iterations": 1, "batch_size": 3, "minibatch_size": 3, "progress": False,
                      "engine": "plain"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    spec = RunSpec.load(tmp_path / "run.yaml", [])
    assert spec.reward == {"model": str(rm)} and spec.model.value_from == str(rm)
    trainer = build_run(spec)
    reward = trainer.env.reward_fn
    assert isinstance(reward, RewardModelReward) and reward.normalization is not None
    critic = trainer.value_head.critic
    rm_trunk = load_reward_model(rm)[0].base_trunk.state_dict()
    ours = critic.lm.base_model.state_dict()
    assert ours.keys() == rm_trunk.keys()
    assert all(torch.equal(ours[k], rm_trunk[k].to(ours[k].device)) for k in ours)


def test_the_critic_starts_from_the_reward_model(folders):
    base, rm = folders
    model, tok, norm = load_reward_model(rm)
    head = ValueHead.separate(HFPolicy(base), from_reward_model=rm)
    trunk = model.base_trunk.state_dict()
    critic = head.critic.lm.base_model.state_dict()
    assert all(torch.equal(critic[k], trunk[k]) for k in trunk)
    # the value at a text's last token is the reward model's normalised score of the text
    ids = torch.tensor([tok("abcaa")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden, _ = head.critic.trunk(ids, mask)
        value = head(hidden)[0, -1]
        score = model(ids, mask)[0]
    assert value.item() == pytest.approx(((score - norm.mean) / norm.std).item(), abs=1e-5)


def test_a_critic_of_another_architecture_is_refused(folders):
    _, rm = folders
    other = tiny_llama(len(char_tokenizer(ALPHABET)) + 5)
    with pytest.raises(ConfigError, match="architecture"):
        ValueHead.separate(HFPolicy(other), from_reward_model=rm)


def test_yaml_reward_mapping_is_checked():
    with pytest.raises(ConfigError, match="unknown"):
        RunSpec.from_dict({"reward": {"model": "x", "normalise": True}})
    with pytest.raises(ConfigError, match="value_from starts a separate critic"):
        RunSpec.from_dict({"model": {"value_from": "x"}})

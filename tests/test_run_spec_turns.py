"""Multi-turn runs from YAML: ``env.interaction`` ('module:Class', built with
``interaction_kwargs``), ``env.tools`` ('module:function' each, run by a ToolInteraction),
``max_turns`` and ``max_episode_tokens``, the modules found beside the file as a reward's are;
the lookup task's own interaction; bad names refused before anything is built."""

from __future__ import annotations

import math
import warnings

import pytest

from ppolm import Interaction, ToolInteraction
from ppolm.config.run_spec import RunSpec
from ppolm.errors import ConfigError
from ppolm.run import build_run

TINY = ["iterations=1", "batch_size=8", "minibatch_size=4", "ppo_epochs=1", "progress=false",
        "model.hidden_size=16", "model.n_layers=1", "max_new_tokens=3"]

MODULE = '''
from ppolm import Interaction, Reply, RewardFunction


class Echo(Interaction):
    """Replies `times` times with the letter given, then ends the episode."""

    def __init__(self, letter, times=1):
        self.letter, self.times = letter, times

    def reset(self, prompt, rng):
        return {"drawn": rng.randrange(100)}

    def reply(self, prompt, turns, state):
        return Reply(self.letter, reward=0.25) if len(turns) <= self.times else None


class TurnCount(RewardFunction):
    def __call__(self, prompts, responses, turns, states):
        return [float(len(t)) for t in turns]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b
'''


def spec(tmp_path, env: str, *overrides: str) -> RunSpec:
    (tmp_path / "mytask.py").write_text(MODULE)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"env: {env}\nreward: mytask:TurnCount\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return RunSpec.load(cfg, [*TINY, *overrides])


def test_an_interaction_named_in_the_yaml_runs_multi_turn_episodes(tmp_path):
    s = spec(tmp_path, "{interaction: mytask:Echo, interaction_kwargs: {letter: a, times: 2}, "
             "max_turns: 4, max_episode_tokens: 40}")
    trainer = build_run(s)
    env = trainer.env
    assert isinstance(env.turns.interaction, Interaction)
    assert type(env.turns.interaction).__name__ == "Echo"
    assert (env.turns.interaction.letter, env.turns.interaction.times) == ("a", 2)
    assert (env.turns.max_turns, env.turns.max_episode_tokens) == (4, 40)
    (row,) = trainer.train()
    assert row["turns_mean"] == 3.0                  # two replies, then the end
    assert math.isfinite(row["policy_loss"])
    # the written config holds the settings and reads back to the same spec
    again = RunSpec.from_dict(s.to_dict(), s.config_dir)
    assert again.env == s.env


def test_tools_named_in_the_yaml_are_run_by_a_tool_interaction(tmp_path):
    s = spec(tmp_path, "{tools: [mytask:add], interaction_kwargs: {timeout: 2, max_calls: 3}, "
             "max_turns: 2}")
    trainer = build_run(s)
    tools = trainer.env.turns.interaction
    assert isinstance(tools, ToolInteraction)
    assert [schema["function"]["name"] for schema in tools.tool_schemas()] == ["add"]
    assert (tools.timeout, tools.max_calls) == (2, 3)


def test_the_lookup_task_brings_its_own_interaction(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("task: lookup\nsampling: {max_new_tokens: 2}\n")
    trainer = build_run(RunSpec.load(cfg, TINY[:-1]))
    assert type(trainer.env.turns.interaction).__name__ == "SecretLookup"
    (row,) = trainer.train()
    assert 1.0 <= row["turns_mean"] <= 2.0


@pytest.mark.parametrize(("env", "words"), [
    ("{interaction: mytask}", "'package.module:name'"),
    ("{tools: [3]}", "'package.module:name'"),
    ("{interaction: mytask:Echo, max_turns: 0}", "env.max_turns=0"),
    ("{interaction: mytask:Missing}", "Cannot import interaction 'mytask:Missing'"),
    ("{tools: [not_a_module_anywhere:add]}", "Cannot import tool.*looked in"),
    ("{interaction: mytask:Echo, interaction_kwargs: {colour: red}}",
     "Cannot build interaction 'mytask:Echo' with \\['colour'\\]"),
])
def test_bad_names_and_settings_are_refused(tmp_path, env, words):
    with pytest.raises(ConfigError, match=words):
        build_run(spec(tmp_path, env))

"""The fast CPU engine's settings and the choice of engine, on every CPU (nothing here is
skipped): cpu_bf16 refused where the CPU has no bf16, the engine refused off the CPU and its
settings refused with the plain engine, which engine a config makes, and no process-wide
malloc setting unless asked (keep_freed_memory)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from ppolm import CallableReward, PPOConfig, TextGenerationEnv, Trainer, TransformerPolicy
from ppolm.engines import FastCPUEngine, FastCPUSettings, PlainEngine
from ppolm.engines.factory import make_engine
from ppolm.engines.fast_cpu import attention
from ppolm.engines.fast_cpu import engine as fast_engine
from ppolm.errors import ConfigError

CPU = torch.device("cpu")


def make_trainer(tok, **overrides) -> Trainer:
    cfg = dict(iterations=1, batch_size=4, minibatch_size=2, ppo_epochs=1, seed=0,
               progress=False, device="cpu")
    cfg.update(overrides)
    env = TextGenerationEnv(["a", "abc"], tok,
                            CallableReward(lambda ps, rs: [r.count("a") / 4 for r in rs]),
                            max_new_tokens=3)
    torch.manual_seed(0)
    return Trainer(TransformerPolicy(len(tok), hidden_size=16), env, PPOConfig(**cfg))


# --- cpu_bf16 ----------------------------------------------------------------------------------
def test_cpu_bf16_supported_answers_a_bool():
    supported = attention.cpu_bf16_supported()
    assert isinstance(supported, bool)
    assert fast_engine.cpu_bf16_supported is attention.cpu_bf16_supported   # what is patched below


@pytest.mark.parametrize("engine", ["fast_cpu", "auto"])
def test_cpu_bf16_refused_where_the_cpu_has_no_bf16(tok, monkeypatch, engine):
    monkeypatch.setattr(fast_engine, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="cpu_bf16=True, but .* no bf16 support"):
        FastCPUEngine(FastCPUSettings(cpu_bf16=True))
    with pytest.raises(ConfigError, match="cpu_bf16=True, but .* no bf16 support"):
        make_trainer(tok, cpu_bf16=True, engine=engine)
    FastCPUEngine(FastCPUSettings(cpu_bf16=False))            # float32 is always fine
    trainer = make_trainer(tok, cpu_bf16=False, engine=engine)
    assert isinstance(trainer.engine, FastCPUEngine) and not trainer.engine.settings.cpu_bf16


# --- where the fast engine runs, and which engine a config makes --------------------------------
@pytest.mark.parametrize("device", ["meta", "cuda", torch.device("meta")])
def test_fast_engine_refused_off_the_cpu(device):
    with pytest.raises(ConfigError, match="CPU only"):
        FastCPUEngine(FastCPUSettings(), device=device)
    with pytest.raises(ConfigError, match="CPU only"):
        make_engine(PPOConfig(engine="fast_cpu"), torch.device(device))


def test_make_engine_picks_the_engine_the_config_names():
    auto = make_engine(PPOConfig(), CPU)
    assert isinstance(auto, FastCPUEngine) and auto.device == CPU
    assert auto.settings == FastCPUSettings()
    assert isinstance(make_engine(PPOConfig(engine="fast_cpu"), CPU), FastCPUEngine)
    plain = make_engine(PPOConfig(engine="plain"), CPU)
    assert isinstance(plain, PlainEngine) and plain.device == CPU
    # 'auto' elsewhere than on a CPU: the plain engine (made without touching the device)
    elsewhere = make_engine(PPOConfig(bf16=False), torch.device("meta"))
    assert isinstance(elsewhere, PlainEngine) and not elsewhere.bf16
    # the config's fast settings reach the engine
    settings = make_engine(PPOConfig(reuse_frozen_layers=False, keep_freed_memory=True),
                           CPU).settings
    assert settings == FastCPUSettings(reuse_frozen_layers=False, keep_freed_memory=True)


@pytest.mark.parametrize("setting", [{"compile": True}, {"cpu_bf16": True},
                                     {"keep_freed_memory": True},
                                     {"reuse_frozen_layers": False}])
def test_fast_settings_refused_with_the_plain_engine(setting):
    (name,) = setting
    with pytest.raises(ConfigError, match=name):
        PPOConfig(engine="plain", **setting)
    # ... and with 'auto' where it picks the plain engine
    with pytest.raises(ConfigError, match=name):
        make_engine(PPOConfig(**setting), torch.device("meta"))
    PPOConfig(engine="fast_cpu", **setting)                   # the engine that reads it


def test_trainer_takes_the_engine_it_is_given(tok):
    engine = PlainEngine(CPU)
    trainer = make_trainer(tok, engine="fast_cpu")
    assert isinstance(trainer.engine, FastCPUEngine)
    assert make_trainer(tok, engine="plain").engine.name == "plain"
    env = trainer.env
    given = Trainer(TransformerPolicy(len(tok), hidden_size=16), env,
                    PPOConfig(iterations=1, batch_size=4, minibatch_size=2, progress=False,
                              device="cpu"), engine=engine)
    assert given.engine is engine and engine.optimizer is not None


# --- keep_freed_memory: process-wide, so only when asked -----------------------------------------
RUN_ONE_ITERATION = """
import sys
import torch
from ppolm import CallableReward, PPOConfig, TextGenerationEnv, Trainer, TransformerPolicy
from ppolm import char_tokenizer
from ppolm.engines import FastCPUEngine
from ppolm.engines.fast_cpu import memory

tok = char_tokenizer("abcdefghij")
env = TextGenerationEnv(["a", "abc"], tok, CallableReward(lambda ps, rs: [0.5] * len(rs)),
                        max_new_tokens=3)
torch.manual_seed(0)
extra = {"keep_freed_memory": True} if sys.argv[1] == "keep" else {}
trainer = Trainer(TransformerPolicy(len(tok), hidden_size=16), env,
                  PPOConfig(iterations=1, batch_size=4, minibatch_size=2, ppo_epochs=1,
                            progress=False, device="cpu", **extra))
assert isinstance(trainer.engine, FastCPUEngine)
assert len(trainer.train()) == 1
print("applied:", memory.applied())
"""


def applied_after_one_iteration(mode: str) -> bool:
    """Build a Trainer and run one iteration in a fresh process (the malloc settings are
    process-wide: this one's flag says nothing); whether they were applied there."""
    done = subprocess.run([sys.executable, "-c", RUN_ONE_ITERATION, mode], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last in ("applied: True", "applied: False"), done.stdout
    return last == "applied: True"


def test_keep_freed_memory_is_off_by_default():
    assert PPOConfig().keep_freed_memory is False
    assert FastCPUSettings().keep_freed_memory is False
    assert applied_after_one_iteration("default") is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_keep_freed_memory_applied_when_asked():
    assert applied_after_one_iteration("keep") is True

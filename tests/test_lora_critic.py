"""A separate critic as a second LoRA adapter on the policy's base model
(``ValueHead.adapter``): no copy of the weights, each loss reaches only its own adapter, the
base stays bit for bit, both adapters go into checkpoints and resume exactly, the fast CPU
engine gives the plain engine's weights, and save_model writes the critic adapter as a standard
adapter folder."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from ppolm import CallableReward, HFPolicy, PPOConfig, TextGenerationEnv, Trainer, ValueHead
from ppolm.engines import PlainEngine, Sequences
from ppolm.errors import ConfigError
from ppolm.policies.lora import AdapterCritic
from ppolm.run import ModelSpec

peft = pytest.importorskip("peft")

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


def lora_policy(tok):
    torch.manual_seed(0)
    return HFPolicy(tiny_llama(len(tok)), peft_config=peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS))


def build(tok, engine="plain", **overrides):
    policy = lora_policy(tok)
    value_head = ValueHead.adapter(policy)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=6)
    cfg = dict(iterations=3, batch_size=8, minibatch_size=4, ppo_epochs=2, seed=0,
               learning_rate=1e-2, progress=False, engine=engine, rollout_logprobs="forward")
    return Trainer(policy, env, PPOConfig(**{**cfg, **overrides}), value_head=value_head)


def weights(policy, part):
    """'default' / 'critic' adapter weights, or 'base' (everything else)."""
    keep = {"default": lambda n: ".default." in n, "critic": lambda n: ".critic." in n,
            "base": lambda n: "lora_" not in n}[part]
    return {k: v.detach().clone() for k, v in policy.named_parameters() if keep(k)}


def changed(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_the_critic_adapter_shares_the_base_weights_and_starts_as_the_base_model(tok):
    policy = lora_policy(tok)
    n_before = sum(p.numel() for p in policy.parameters())
    value_head = ValueHead.adapter(policy)
    critic = value_head.critic
    assert isinstance(critic, AdapterCritic)
    # the critic owns nothing: the value head's parameters are its linear layer's alone
    assert list(value_head.parameters()) == list(value_head.linear.parameters())
    adapter = critic.adapter_parameters()
    assert adapter and all(p.requires_grad for p in adapter)
    # the base weights exist once: only the critic adapter was added to the policy's model
    assert sum(p.numel() for p in policy.parameters()) == n_before + sum(
        p.numel() for p in adapter)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h_policy, _ = policy.trunk(ids, mask)
        h_critic, _ = critic.trunk(ids, mask)
    torch.testing.assert_close(h_critic, h_policy, rtol=0, atol=0)    # B = 0 in both adapters
    assert policy.model.active_adapter == "default"


def test_each_loss_reaches_only_its_own_adapter(tok):
    policy = lora_policy(tok)
    value_head = ValueHead.adapter(policy)
    engine = PlainEngine("cpu")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [5, 5, 6, 7, 3, 4]])
    seqs = Sequences(ids, torch.ones_like(ids), response_len=3)

    value_head(engine.forward_hidden(value_head.critic, seqs)).square().sum().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if ".default." in n)
    # lora_A gets a gradient only once lora_B is non-zero: B's gradient is what starts it
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items()
               if ".critic." in n and "lora_B" in n)
    policy.zero_grad(set_to_none=True)

    engine.forward_response(policy, seqs, 1.0).logprobs.sum().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if ".critic." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items()
               if ".default." in n and "lora_B" in n)
    # the switch put every flag back
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_training_moves_both_adapters_and_leaves_the_base_alone(tok):
    trainer = build(tok)
    policy = trainer.policy
    base, default, critic = (weights(policy, k) for k in ("base", "default", "critic"))
    history = trainer.train()
    assert changed(base, weights(policy, "base")) == 0.0
    assert changed(default, weights(policy, "default")) > 1e-4
    assert changed(critic, weights(policy, "critic")) > 1e-4
    assert all(h["value_loss"] >= 0 for h in history)


def test_without_a_value_loss_the_critic_adapter_does_not_move(tok):
    trainer = build(tok, vf_coef=0.0)
    critic = weights(trainer.policy, "critic")
    default = weights(trainer.policy, "default")
    trainer.train()
    assert changed(critic, weights(trainer.policy, "critic")) == 0.0
    assert changed(default, weights(trainer.policy, "default")) > 1e-4


def test_the_fast_cpu_engine_gives_the_plain_engines_adapters(tok):
    plain, fast = build(tok, iterations=1), build(tok, engine="fast_cpu", iterations=1)
    plain.train()
    fast.train()
    for part in ("default", "critic"):
        a, b = weights(plain.policy, part), weights(fast.policy, part)
        assert changed(a, b) < 1e-5, part


def test_gradient_checkpointing_recomputes_the_critics_layers_with_its_adapter(tok):
    """The critic runs the policy's layers; recomputed in backward, after the critic's adapter
    was switched off, they run with the adapter of their forward again: the weights after an
    iteration are those of training without checkpointing."""
    plain = build(tok, iterations=1)
    checkpointed = build(tok, iterations=1, gradient_checkpointing=True)
    assert checkpointed.engine.checkpointed_layers
    plain.train()
    checkpointed.train()
    for part in ("default", "critic"):
        a, b = weights(plain.policy, part), weights(checkpointed.policy, part)
        assert changed(a, b) < 1e-6, part


def test_both_adapters_go_into_checkpoints_and_resume_exactly(tok, tmp_path):
    whole = build(tok, output_dir=str(tmp_path / "whole"))
    whole.train()
    first = build(tok, iterations=2, output_dir=str(tmp_path / "split"), save_every=1)
    first.train()
    assert (tmp_path / "split" / "checkpoints" / "iter-0000002" / "policy" / "critic"
            / "adapter_model.safetensors").is_file()
    resumed = build(tok, output_dir=str(tmp_path / "split"))
    assert resumed.resume() == 2
    resumed.train()
    for part in ("default", "critic"):
        assert changed(weights(whole.policy, part), weights(resumed.policy, part)) == 0.0, part
    torch.testing.assert_close(whole.value_head.linear.weight, resumed.value_head.linear.weight,
                               rtol=0, atol=0)


def test_save_model_writes_the_critic_as_a_standard_adapter_folder(tok, tmp_path):
    trainer = build(tok, iterations=1)
    trainer.train()
    trainer.save_model(tmp_path / "out")
    torch.manual_seed(0)
    base = tiny_llama(len(tok))
    critic = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / "critic"))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want, _ = trainer.value_head.critic.trunk(ids, mask)
        got = critic.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_uses_are_clear_errors(tok):
    with pytest.raises(ConfigError, match="needs a LoRA policy"):
        ValueHead.adapter(HFPolicy(tiny_llama(len(tok))))
    policy = lora_policy(tok)
    ValueHead.adapter(policy)
    with pytest.raises(ConfigError, match="already has an adapter named 'critic'"):
        ValueHead.adapter(policy)
    with pytest.raises(ConfigError, match="needs model.lora"):
        ModelSpec(kind="hf", path="x", value="adapter")


def test_yaml_value_adapter_builds_the_critic_adapter(tok, tmp_path):
    from ppolm.run import RunSpec, build_run

    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    spec = RunSpec.from_dict({
        "model": {"kind": "hf", "path": str(tmp_path / "m"), "value": "adapter",
                  "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}},
        "task": "continue", "ppo": {"engine": "plain", "progress": False}})
    trainer = build_run(spec)
    assert isinstance(trainer.value_head.critic, AdapterCritic)
    assert set(trainer.policy.model.peft_config) == {"default", "critic"}
    assert trainer.policy.model.peft_config["critic"].r == 8

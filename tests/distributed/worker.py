"""Runs under ``torchrun`` for tests/test_distributed.py (and, for the one-process side of a
comparison, under plain ``python``). ``python worker.py MODE OUT``:

* ``update``: for a shared value head and a separate critic, and for DDP and FSDP2 (one
  process: no wrapper), one PPO update from FIXED episodes (the whole batch sampled from the
  same generator on every rank; each rank keeps its share); rank 0 writes the trained weights
  (gathered whole) and the iteration's metrics to OUT/NAME.pt.
* ``bad_reward``: a run whose reward raises on rank 1 only.
* ``train``: a short run with checkpoints in OUT (resumed when OUT has one), rank 0 writing the
  final weights to OUT/final.pt.
* ``engine_state``: the distributed engine's state_dict loaded into a fresh engine gives the
  same next update (OUT/engine_state.pt).
* ``lora_export``: a LoRA run under DDP with checkpoints, and the live policy's save_model
  (CRITIC=adapter: with a critic adapter, and a resume of it).
* ``lookup``: two iterations of the multi-turn 'lookup' task; each rank writes the draws of
  its episodes' generators, in order, to OUT/draws-RANK.json.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ppolm import PPOConfig, TextGenerationEnv, Trainer, ValueHead, char_tokenizer
from ppolm.policies.hf import HFPolicy
from ppolm.rollout.rewards import CallableReward
from ppolm.rollout.types import Episodes

PROMPTS = ["ab", "ba", "abc", "cab", "bca", "cc", "aab", "bba"]
ALPHABET = "abc"


def count_a(prompts: list[str], responses: list[str]) -> list[float]:
    return [r.count("a") / 4 for r in responses]


def tiny_llama(vocab: int, lora: bool = False) -> HFPolicy:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=64, tie_word_embeddings=False,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    if lora:
        import peft
        # lora_B starts at zero: random, so that the update has gradients everywhere
        return HFPolicy(model, peft_config=peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return HFPolicy(model)


def rows(episodes: Episodes, part: slice) -> Episodes:
    """The episodes of rows ``part``."""
    cut = {}
    for f in fields(episodes):
        v = getattr(episodes, f.name)
        if isinstance(v, (list, torch.Tensor)):
            cut[f.name] = v[part]
    return replace(episodes, **cut)


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ppolm.engines.base import trained_modules

    trained = trained_modules(trainer.policy, trainer.value_head)
    if not dist.is_initialized():
        return {k: v.detach().clone() for k, v in trained.state_dict().items()}
    whole = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    return {k: v.detach().clone() for k, v in whole.items()}   # (DDP's are the live tensors)


def update(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torchrun = "MASTER_ADDR" in os.environ            # one rank under torchrun included
    # fsdp_ckpt: FSDP2 with gradient checkpointing; fsdp_meta: FSDP2 on models built on the
    # meta device (empty_policy), each rank reading its shards of the same weights from the
    # safetensors files of a folder; ddp_meta: the same read whole on every rank
    strategies = (["ddp", "fsdp", "fsdp_ckpt", "fsdp_meta", "ddp_meta"] if torchrun
                  else ["single"])
    runs = [(head, s) for head in ("shared", "separate") for s in strategies]
    # LoRA: DDP only; with a value head on the policy's states, and on a critic that is a
    # second adapter on the policy's base model
    runs += [(head, "ddp_lora" if torchrun else "single_lora") for head in ("shared", "adapter")]
    for head, strategy in runs:
        tok = char_tokenizer(ALPHABET)
        policy = tiny_llama(len(tok), lora=strategy.endswith("lora"))
        env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=4,
                                seed=0)
        whole = env.sample(policy, 8, 1.0, torch.device("cpu"),
                           torch.Generator().manual_seed(123))
        if strategy.endswith("_meta"):
            from ppolm.policies.pretrained import empty_policy

            folder = out / "tiny-llama"
            if rank == 0:             # (transformers writes the weights on rank 0 alone)
                policy.model.save_pretrained(folder)
            dist.barrier()            # (the group the runs before started)
            rng = torch.get_rng_state()       # (value heads drawn as after tiny_llama)
            policy = empty_policy(folder)
            torch.set_rng_state(rng)
            assert all(p.is_meta for p in policy.parameters())
        value_head = (ValueHead.separate(policy) if head == "separate" else
                      ValueHead.adapter(policy) if head == "adapter" else None)
        config = PPOConfig(iterations=1, batch_size=8, minibatch_size=8, ppo_epochs=1,
                           learning_rate=1e-2, rollout_logprobs="forward", engine="plain",
                           distributed="fsdp" if "fsdp" in strategy else "ddp",
                           gradient_checkpointing=strategy == "fsdp_ckpt",
                           progress=False, kl_coef=0.1)
        trainer = Trainer(policy, env, config, value_head=value_head)
        n = 8 // world
        row = trainer.iterate(episodes=rows(whole, slice(rank * n, (rank + 1) * n)))
        state = full_state(trainer)
        budget = kl_budget(trainer, tok) if head == "shared" and "ckpt" not in strategy else None
        refused = fsdp_refusal(config, env, tok) if torchrun and head == "adapter" else None
        if rank == 0:
            torch.save({"state": state, "metrics": row, "engine": trainer.engine.name,
                        "world_size": trainer.world.size, "kl_budget": budget,
                        "fsdp_refusal": refused}, out / f"{strategy}-{head}.pt")
        if dist.is_initialized():
            dist.barrier()


def fsdp_refusal(config: PPOConfig, env: TextGenerationEnv, tok) -> str:
    """The error of a LoRA policy with a critic adapter under FSDP2 (every rank raises it)."""
    from ppolm.errors import ConfigError

    policy = tiny_llama(len(tok), lora=True)
    try:
        Trainer(policy, env, replace(config, distributed="fsdp"),
                value_head=ValueHead.adapter(policy))
    except ConfigError as e:
        return str(e)
    raise AssertionError("FSDP2 took a critic adapter")


def kl_budget(trainer: Trainer, tok) -> dict:
    """fit_kl_budget of the trained policy through the trainer's engine (under FSDP2: on the
    ranks' shards), to half the KL it has: the tries (alpha, KL, reward) and the weights it
    leaves (gathered whole)."""
    from ppolm.evaluation.kl_budget import fit_kl_budget

    settings = dict(max_new_tokens=4, seed=5, engine=trainer.engine)
    fit = fit_kl_budget(trainer.policy, trainer.reference, tok, PROMPTS,
                        CallableReward(count_a), budget=1e-3, max_tries=2, **settings)
    return {"tries": fit.tries, "alpha": fit.alpha, "state": full_state(trainer)}


def bad_reward(out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        if rank == 1:
            raise ValueError("this reward fails on rank 1")
        return count_a(prompts, responses)

    tok = char_tokenizer(ALPHABET)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(reward), max_new_tokens=4)
    trainer = Trainer(tiny_llama(len(tok)), env, PPOConfig(
        iterations=2, batch_size=8, minibatch_size=4, progress=False, dist_timeout=60))
    trainer.train()


def train(out: Path) -> None:
    tok = char_tokenizer(ALPHABET)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=4)
    config = PPOConfig(iterations=int(os.environ.get("ITERATIONS", "4")), batch_size=8,
                       minibatch_size=4, ppo_epochs=2, learning_rate=1e-2, progress=False,
                       output_dir=str(out), save_every=1, keep_checkpoints=10,
                       distributed=os.environ.get("STRATEGY", "ddp"))  # type: ignore[arg-type]
    trainer = Trainer(tiny_llama(len(tok)), env, config,
                      value_head=ValueHead.separate(tiny_llama(len(tok))))
    if any((out / "checkpoints").glob("iter-*")):
        trainer.resume()
    trainer.train()
    state = full_state(trainer)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, out / "final.pt")


def lora_export(out: Path) -> None:
    """DDP on the ranks, a LoRA policy with a shared value head (CRITIC=adapter: a critic that
    is a second adapter): a short run with checkpoints in OUT; rank 0 then writes the live
    policy with save_model into OUT/live (merged) and OUT/live-adapters (the adapters alone).
    With the critic adapter, a fresh Trainer also resumes from the first checkpoint (into
    OUT/resumed) and rank 0 writes both runs' final weights to OUT/resume.pt."""
    tok = char_tokenizer(ALPHABET)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=4)
    adapter = os.environ.get("CRITIC") == "adapter"

    def build(folder: Path) -> Trainer:
        config = PPOConfig(iterations=2, batch_size=8, minibatch_size=4, learning_rate=1e-2,
                           progress=False, output_dir=str(folder), save_every=1)
        policy = tiny_llama(len(tok), lora=True)
        return Trainer(policy, env, config, value_head=ValueHead.adapter(policy) if adapter
                       else ValueHead(policy.hidden_size))

    trainer = build(out)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        trainer.save_model(out / "live")
        trainer.save_model(out / "live-adapters", merge=False)
    if adapter:
        resumed = build(out / "resumed")
        resumed.resume(out / "checkpoints" / "iter-0000001")
        resumed.train()
        whole, again = full_state(trainer), full_state(resumed)
        if rank == 0:
            torch.save({"whole": whole, "resumed": again}, out / "resume.pt")


def engine_step(engine, batch: int) -> None:
    """One update of ``engine`` on this rank's half of a batch of random tokens."""
    from ppolm.engines import Sequences

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 6, (4, 8), generator=g)
    adv = torch.randn(4, 4, generator=g)
    rank, world = dist.get_rank(), dist.get_world_size()
    part = slice(rank * 4 // world, (rank + 1) * 4 // world)
    ids, adv = ids[part], adv[part]
    policy, value_head = engine.trained["policy"], engine.trained["value_head"]
    with engine.update():
        engine.zero_grad()
        fwd = engine.forward_response(policy, Sequences(ids, torch.ones_like(ids), 4), 1.0)
        values = engine.value(value_head, fwd.hidden)
        engine.backward(-(fwd.logprobs * adv).mean() + (values - adv).pow(2).mean())
        assert engine.step().applied


def engine_state(out: Path) -> None:
    """For DDP and FSDP2: engine A takes two steps; B (other weights, a fresh optimizer) loads
    a copy of A's state_dict; C loads A's weights only; each then takes the same step. Rank 0
    writes the largest differences of the whole (gathered) weights and AdamW states."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from ppolm.engines import OptimizerSettings
    from ppolm.engines.distributed import DistributedEngine
    from ppolm.parallel.world import init_process_group

    init_process_group(torch.device("cpu"), 120)     # (a Trainer starts it itself)

    def build(strategy: str, seed: int) -> DistributedEngine:
        policy = tiny_llama(6)
        torch.manual_seed(seed)               # other weights for B and C
        for p in policy.parameters():
            p.data.normal_(0, 0.02)
        value_head = ValueHead(policy.hidden_size)
        engine = DistributedEngine("cpu", strategy)  # type: ignore[arg-type]
        engine.setup(policy, value_head, policy.reference_model(), OptimizerSettings(1e-2))
        return engine

    def whole(engine: DistributedEngine) -> dict[str, torch.Tensor]:
        models, optim = get_state_dict(engine.trained, engine.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        flat = {f"models.{k}": v for k, v in models.items()}
        for name, s in optim.get("state", {}).items():
            flat.update({f"optimizer.{name}.{k}": v for k, v in s.items()})
        # (copies: whole tensors on the CPU are the live ones)
        return {k: v.detach().clone() for k, v in flat.items()}

    def diff(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
        assert x.keys() == y.keys()
        return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)

    found = {}
    for strategy in ("ddp", "fsdp"):
        a, b, c = build(strategy, 0), build(strategy, 1), build(strategy, 1)
        engine_step(a, 1)
        engine_step(a, 2)
        before = whole(a), whole(b)
        assert a.sharded and set(a.state_dict()) == {"models", "optimizer"}
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        c.load_state_dict({"models": copy.deepcopy(a.state_dict()["models"]),
                           "optimizer": c.state_dict()["optimizer"]})
        for engine in (a, b, c):
            engine_step(engine, 3)
        wa, wb, wc = whole(a), whole(b), whole(c)
        if dist.get_rank() == 0:
            found[strategy] = {
                "before": diff({k: v for k, v in before[0].items() if k.startswith("models.")},
                               {k: v for k, v in before[1].items() if k.startswith("models.")}),
                "loaded": diff(wa, wb),
                "weights_only": diff({k: v for k, v in wa.items() if k.startswith("models.")},
                                     {k: v for k, v in wc.items() if k.startswith("models.")}),
                "sharded": [type(v).__name__ for v in a.state_dict()["models"].values()][0]}
    if dist.get_rank() == 0:
        torch.save(found, out / "engine_state.pt")


def lookup(out: Path) -> None:
    import json
    import random
    from typing import Any

    from ppolm.rollout.tasks import SecretLookup, make_task

    draws: list[float] = []

    class Recorded(SecretLookup):
        """The lookup task, keeping one more draw of each episode's generator."""

        def reset(self, prompt: str, rng: random.Random) -> dict[str, Any]:
            state = super().reset(prompt, rng)
            draws.append(rng.random())
            return state

    task = make_task("lookup")
    tok = char_tokenizer(task.alphabet)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=task.max_new_tokens,
                            interaction=Recorded(), max_turns=task.max_turns, seed=3)
    Trainer(tiny_llama(len(tok)), env, PPOConfig(
        iterations=2, batch_size=8, minibatch_size=8, ppo_epochs=1, progress=False,
        engine="plain")).train()
    (out / f"draws-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(draws))


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"update": update, "bad_reward": bad_reward, "train": train,
     "engine_state": engine_state, "lookup": lookup, "lora_export": lora_export}[mode](folder)

"""Group sampling and the critic-free estimators inside the Trainer: the layout of a group,
the estimators' advantages as the pure functions give them, no value function anywhere, the
loss aggregation, resume, and a toy task learnt with GRPO."""

from __future__ import annotations

import copy

import pytest
import torch

from ppolm import (
    CallableReward,
    ConfigError,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    ValueHead,
    char_tokenizer,
)
from ppolm.maths.aggregation import aggregate_loss
from ppolm.maths.estimators import (
    dr_grpo_advantages,
    grpo_advantages,
    rloo_advantages,
)
from ppolm.rollout.tasks import make_task

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]
KL_LOSS = dict(kl_mode="loss", kl_estimator="k3")


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


def make_trainer(tok, reward=count_a, **overrides):
    torch.manual_seed(0)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(reward), max_new_tokens=8)
    cfg = dict(iterations=1, batch_size=16, minibatch_size=8, ppo_epochs=2, seed=0,
               samples_per_prompt=4, progress=False)
    return Trainer(TransformerPolicy(len(tok), hidden_size=32), env,
                   PPOConfig(**{**cfg, **overrides}))


def test_a_batch_holds_groups_of_k_responses_to_one_prompt(tok):
    trainer = make_trainer(tok, advantage_estimator="grpo", **KL_LOSS)
    episodes, rollout = trainer.collect()
    groups = [episodes.prompts[g * 4:(g + 1) * 4] for g in range(4)]
    assert all(len(set(g)) == 1 for g in groups)               # one prompt per group
    assert len({g[0] for g in groups}) == 4                    # four prompts, each once
    assert trainer.env.state_dict()["pos"] == 4                # n / k prompts consumed
    responses = [episodes.responses[g * 4:(g + 1) * 4] for g in range(4)]
    assert any(len(set(r)) > 1 for r in responses)             # k draws, not one repeated


@pytest.mark.parametrize(("name", "fn"), [("grpo", grpo_advantages),
                                          ("dr_grpo", dr_grpo_advantages),
                                          ("rloo", rloo_advantages)])
def test_the_trainer_uses_the_estimators_advantages(tok, name, fn):
    trainer = make_trainer(tok, advantage_estimator=name, **KL_LOSS)
    _, rollout = trainer.collect()
    adv = trainer.compute_advantages(rollout)
    expect = fn(rollout.scores, rollout.response_mask, 4)
    assert torch.equal(adv.advantages, expect)
    assert (adv.advantages != 0).any()


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp",
                                       "reinforce_pp_baseline"])
def test_critic_free_runs_build_and_run_no_value_function(tok, estimator):
    kl = {} if estimator.startswith("reinforce") else KL_LOSS
    trainer = make_trainer(tok, advantage_estimator=estimator, iterations=2, **kl)
    assert trainer.value_head is None
    policy_params = [p for p in trainer.policy.parameters() if p.requires_grad]
    assert len(trainer.engine.params) == len(policy_params)     # nothing else is optimised
    before = copy.deepcopy(trainer.policy.state_dict())
    history = trainer.train()
    for row in history:
        assert "value_loss" not in row and "explained_variance" not in row
        assert 0.0 <= row["zero_signal_groups"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    with pytest.raises(ConfigError, match="no value function"):
        Trainer(TransformerPolicy(len(tok), hidden_size=32),
                TextGenerationEnv(PROMPTS, tok, CallableReward(count_a)),
                trainer.config, value_head=ValueHead(32))


def test_equal_rewards_in_every_group_carry_no_signal(tok):
    trainer = make_trainer(tok, reward=lambda p, r: [0.5] * len(r), advantage_estimator="grpo",
                           **KL_LOSS)
    _, rollout = trainer.collect()
    assert torch.equal(trainer.compute_advantages(rollout).advantages,
                       torch.zeros_like(rollout.response_mask))
    assert trainer.train()[0]["zero_signal_groups"] == 1.0


def test_dr_grpo_aggregates_over_a_constant_length(tok):
    """Dr. GRPO's loss: the sum of the per-token terms over max_new_tokens x sequences, with
    no per-sequence length normalisation; GRPO's: the mean of each sequence's token mean."""
    for name, mode in (("dr_grpo", "seq-mean-token-sum-norm"), ("grpo", "seq-mean-token-mean")):
        trainer = make_trainer(tok, advantage_estimator=name, kl_coef=0.0, kl_mode="loss")
        assert trainer.config.aggregation == mode
        _, rollout = trainer.collect()
        adv = trainer.compute_advantages(rollout)
        mask = rollout.response_mask
        with torch.no_grad():
            for p in trainer.policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        loss, _ = trainer.loss(rollout, adv, mask.sum(), 16)
        from ppolm.engines import Sequences

        fwd = trainer.engine.forward_response(
            trainer.policy, Sequences(rollout.input_ids, rollout.attention_mask,
                                      mask.shape[1]), 1.0)
        ratio = torch.exp(fwd.logprobs - rollout.logprobs)
        per_token = torch.maximum(-adv.advantages * ratio,
                                  -adv.advantages * ratio.clamp(0.8, 1.2))
        if name == "dr_grpo":
            expect = (per_token * mask).sum() / (16 * 8)
        else:
            expect = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        assert loss.item() == pytest.approx(expect.item(), rel=1e-5, abs=1e-7)
        assert loss.item() != pytest.approx(
            aggregate_loss(per_token, mask, "token-mean").item(), rel=1e-3)


def test_group_sampling_resumes_exactly(tok):
    a = make_trainer(tok, advantage_estimator="rloo", iterations=1, **KL_LOSS)
    a.train()
    b = make_trainer(tok, advantage_estimator="rloo", iterations=1, seed=3, **KL_LOSS)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.config.iterations = b.config.iterations = 3
    ha, hb = a.train(), b.train()
    assert [r["score_mean"] for r in ha[-2:]] == [r["score_mean"] for r in hb]
    for p, q in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("overrides", "words"), [
    (dict(advantage_estimator="grpo", samples_per_prompt=1), "samples_per_prompt >= 2"),
    (dict(advantage_estimator="grpo", samples_per_prompt=4, kl_mode="reward"), "kl_mode=loss"),
    (dict(samples_per_prompt=3), "not a multiple"),
    (dict(loss_aggregation="seq-mean"), "loss_aggregation"),
])
def test_bad_estimator_settings_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        PPOConfig(batch_size=16, minibatch_size=8, **overrides)


def best_toy_score(task_name, estimator, hidden_size=64, **overrides):
    """Train a fresh policy (seed 0, no value head) on a built-in toy task; the best
    5-iteration mean score."""
    torch.manual_seed(0)
    task = make_task(task_name)
    tok = char_tokenizer(task.alphabet)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=task.max_new_tokens)
    kl = KL_LOSS if estimator in ("grpo", "dr_grpo", "rloo") else {}
    config = PPOConfig(**{**dict(iterations=100, batch_size=64, minibatch_size=16,
                                 learning_rate=1e-3, samples_per_prompt=4, kl_coef=0.01,
                                 seed=0, progress=False), **overrides},
                       advantage_estimator=estimator, **kl)
    trainer = Trainer(TransformerPolicy(len(tok), hidden_size=hidden_size), env, config)
    assert trainer.value_head is None
    history = trainer.train()
    # (with dynamic sampling, the mean over every episode sampled, not only those trained on)
    scores = [r.get("sampled_score_mean", r["score_mean"]) for r in history]
    return max(sum(scores[i:i + 5]) / 5 for i in range(len(history) - 4))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp",
                                       "reinforce_pp_baseline"])
def test_each_critic_free_estimator_learns_the_toy_task(estimator):
    """100 iterations of 64 episodes (16 prompts x 4) on target_char, no value head: the best
    5-iteration mean score reaches 85% of the optimum (seed 0 measured: grpo 0.996, dr_grpo
    0.907, rloo 0.936, reinforce_pp 1.0, reinforce_pp_baseline 0.987; a few seconds each)."""
    best = best_toy_score("target_char", estimator)
    assert best >= 0.85, best


@pytest.fixture
def one_thread():
    """One torch thread, as measured (two threads on a shared 2-core CPU run many times
    slower), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp",
                                       "reinforce_pp_baseline"])
def test_each_critic_free_estimator_learns_the_continue_task(estimator, one_thread):
    """600 iterations of 80 episodes (10 prompts x 8 samples), one epoch of 5 minibatches, lr
    1e-3, on `continue` (6 letters continuing a cyclic run; optimum 1.0), no value head: the
    best 5-iteration mean score reaches 90% of the optimum. grpo with dynamic sampling (at most
    4 rounds; the score is then the mean over every episode sampled): without it, once most
    prompts are solved the groups that all score 1.0 fill the batch with zero advantages, and
    grpo crossed 0.9 late or not at all (best 0.998, 0.895, 1.0, 1.0 for seeds 0-3 on this
    machine, 0.858 at seed 0 on another); with it 0.994, 0.997, 0.987, 0.996 (docs/experiments.md).
    Seed 0 measured for the others (one torch thread): dr_grpo 0.956, rloo 0.957, reinforce_pp
    1.000, reinforce_pp_baseline 0.999; 17-26 s each on a shared 2-core CPU (dynamic sampling
    did not raise dr_grpo or rloo: 0.948/0.939 and 0.950/0.954 at seeds 0/1). With
    target_char's settings (4 samples, 4 epochs) the policy settles on wrong letters it no
    longer explores away from and plateaus at 0.7-0.9; one epoch per batch and 8 samples per
    prompt avoid it."""
    dynamic = dict(dynamic_sampling=True, max_sampling_rounds=4) if estimator == "grpo" else {}
    best = best_toy_score("continue", estimator, iterations=600, batch_size=80,
                          samples_per_prompt=8, ppo_epochs=1, **dynamic)
    assert best >= 0.9, best


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp",
                                       "reinforce_pp_baseline"])
def test_the_first_ratio_is_one_for_every_estimator(tok, estimator):
    kl = {} if estimator.startswith("reinforce") else KL_LOSS
    trainer = make_trainer(tok, advantage_estimator=estimator, rollout_logprobs="forward", **kl)
    _, rollout = trainer.collect()
    adv = trainer.compute_advantages(rollout)
    idx = torch.arange(8)
    first = rollout.select(idx)
    _, stats = trainer.loss(first, adv.select(idx), first.response_mask.sum(), 8)
    # (1 up to float rounding: the rollout's head runs without gradient, in blocks)
    assert stats["ratio_max_dev"] <= 1e-6
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)

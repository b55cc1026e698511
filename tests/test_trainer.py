"""PPO invariants of the Trainer: ratio 1 on the first minibatch (exactly, when the rollout
recomputes the logprobs), zero KL before any update, gradient accumulation equal to one big
batch, non-finite updates skipped, HF runs."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from ppolm import (
    CallableReward,
    HFPolicy,
    LSTMPolicy,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
)
from ppolm.engines import PlainEngine, Sequences
from ppolm.errors import TrainingError
from ppolm.maths.losses import full_kl

# Prompts of different lengths, so rows carry left padding; an untrained policy emits EOS at
# random times, so responses carry right padding too.
PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]


def count_a(prompts, responses):
    return [r.count("a") / 8 for r in responses]


def make_policy(kind: str, vocab: int):
    torch.manual_seed(0)
    return {"lstm": lambda: LSTMPolicy(vocab, hidden_size=32),
            "transformer": lambda: TransformerPolicy(vocab, hidden_size=32),
            "llama": lambda: HFPolicy(tiny_llama(vocab)),
            "gpt2": lambda: HFPolicy(tiny_gpt2(vocab))}[kind]()


def plain_forward(policy, ids, mask, T, temperature, **kw):
    """The reference implementation's response forward (PlainEngine)."""
    return PlainEngine().forward_response(policy, Sequences(ids, mask, T), temperature, **kw)


def make_trainer(kind, tok, tmp_path, **overrides):
    cfg = dict(iterations=1, batch_size=16, minibatch_size=8, ppo_epochs=2, seed=0,
               progress=False, output_dir=str(tmp_path))
    cfg.update(overrides)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=8)
    return Trainer(make_policy(kind, len(tok)), env, PPOConfig(**cfg))


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
@pytest.mark.parametrize("kind", ["lstm", "transformer", "llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("source", ["forward", "sampler"])
def test_first_minibatch_ratio_is_one(kind, temperature, source, engine, tok, tmp_path):
    """Exactly 1 when the rollout recomputes the logprobs with the update's forward; 1 up to
    float rounding when they come from the sampling pass (the KV cache sums in another order)."""
    trainer = make_trainer(kind, tok, tmp_path, temperature=temperature, micro_batch_size=4,
                           rollout_logprobs=source, engine=engine)
    episodes, rollout = trainer.collect()
    mask = rollout.response_mask
    assert (mask.sum(1) < mask.shape[1]).any(), "want some right padding after EOS"
    assert (rollout.attention_mask[:, 0] == 0).any(), "want some left padding"
    tol = 0.0 if source == "forward" else 1e-5
    # KL to the reference is 0 before any update.
    assert (rollout.logprobs - rollout.ref_logprobs).abs().max() <= tol
    advantages = trainer.compute_advantages(rollout)
    idx = torch.randperm(16)[:8]
    first = rollout.select(idx)
    _, stats = trainer.loss(first, advantages.select(idx), first.response_mask.sum())
    assert stats["ratio_max_dev"] <= max(tol, 1e-6)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-7 + tol ** 2)
    history = trainer.train()
    assert history[0]["ratio_dev_first"] <= max(tol, 1e-6)
    assert abs(history[0]["kl"]) <= tol * 8


@pytest.mark.parametrize("kind", ["lstm", "transformer", "llama"])
def test_the_sampler_records_what_a_forward_pass_computes(kind, tok, tmp_path):
    """The logprobs, value-head states and values kept from the sampling pass equal those of a
    separate forward over the finished sequences (same samples: same seed)."""
    fast = make_trainer(kind, tok, tmp_path / "a", rollout_logprobs="sampler")
    slow = make_trainer(kind, tok, tmp_path / "b", rollout_logprobs="forward")
    (ea, ra), (eb, rb) = fast.collect(), slow.collect()
    assert torch.equal(ra.input_ids, rb.input_ids)
    assert ea.hidden is not None and eb.hidden is None
    real = ra.response_mask.bool()
    for name in ("logprobs", "ref_logprobs", "values"):
        a, b = getattr(ra, name), getattr(rb, name)
        assert torch.allclose(a[real], b[real], atol=1e-5), name
    fwd = plain_forward(slow.policy, rb.input_ids, rb.attention_mask, real.shape[1], 1.0)
    assert torch.allclose(ea.hidden[real], fwd.hidden[real], atol=1e-5)


def test_logprobs_at_rollout_match_the_sampling_distribution(tok, tmp_path):
    """The stored logprobs are those of the distribution the tokens were drawn from: the
    empirical frequency of the first response token matches exp(logprob)."""
    trainer = make_trainer("transformer", tok, tmp_path, batch_size=512, minibatch_size=512,
                           temperature=0.5)
    trainer.env.prompts = ["abc"] * len(trainer.env.prompts)
    trainer.env.prompt_ids = [tok("abc")["input_ids"]] * len(trainer.env.prompts)
    _, rollout = trainer.collect()
    first_tok = rollout.input_ids[:, 3]
    probs = {}
    for t, lp in zip(first_tok.tolist(), rollout.logprobs[:, 0].tolist(), strict=True):
        probs[t] = math.exp(lp)
    for t, p in probs.items():
        freq = (first_tok == t).float().mean().item()
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / 512) + 1e-3


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
@pytest.mark.parametrize("kind", ["transformer", "llama"])
def test_gradient_accumulation_equals_one_big_minibatch(kind, engine, tok, tmp_path):
    big = make_trainer(kind, tok, tmp_path, minibatch_size=8, micro_batch_size=8, engine=engine)
    small = make_trainer(kind, tok, tmp_path, minibatch_size=8, micro_batch_size=4,
                         engine=engine)
    small.policy.load_state_dict(big.policy.state_dict())
    small.value_head.load_state_dict(big.value_head.state_dict())
    _, rollout = big.collect()
    adv = big.compute_advantages(rollout)
    idx = torch.arange(8)
    mb, mb_adv = rollout.select(idx), adv.select(idx)
    with big.engine.update():
        stats_big = big.accumulate_gradients(mb, mb_adv)
        big.engine.step()
    with small.engine.update():
        stats_small = small.accumulate_gradients(mb, mb_adv)
        small.engine.step()
    for a, b in zip(big.engine.params, small.engine.params, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)      # the same step taken
    assert stats_big["loss"] == pytest.approx(stats_small["loss"], rel=1e-5)


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
def test_hf_policy_update_lowers_the_loss_of_its_batch(tok, tmp_path, engine):
    """One optimizer step on one minibatch moves the weights down the PPO loss of that
    minibatch: the surrogate falls (a wrong-sign gradient would raise it)."""
    trainer = make_trainer("llama", tok, tmp_path, batch_size=16, minibatch_size=16,
                           ppo_epochs=1, learning_rate=1e-3, engine=engine)
    _, rollout = trainer.collect()
    advantages = trainer.compute_advantages(rollout)
    num_tokens = rollout.response_mask.sum()

    def policy_loss() -> float:
        with trainer.engine.update(), torch.no_grad():
            return trainer.loss(rollout, advantages, num_tokens)[1]["policy_loss"]

    before = policy_loss()
    trainer.update(rollout, advantages)
    after = policy_loss()
    assert after < before - 1e-4, (before, after)


def test_hf_policy_iteration_changes_weights_with_finite_metrics(tok, tmp_path):
    trainer = make_trainer("llama", tok, tmp_path, iterations=2)
    before = copy.deepcopy(trainer.policy.state_dict())
    history = trainer.train()
    changed = [not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items()]
    assert any(changed)
    for row in history:
        for key in ("reward_mean", "kl", "entropy", "approx_kl", "clipfrac", "value_loss"):
            assert math.isfinite(row[key]), key
    # the reference stays frozen
    ref = trainer.reference.state_dict()
    assert all(torch.equal(before[k], ref[k]) for k in before)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_warmup_scales_the_first_adam_steps_then_the_schedule_runs(tok, tmp_path):
    """Adam's first step moves each weight by lr * g / (|g| + eps), about the full learning rate
    whatever the gradient's size: with a warm-up of n steps the largest move is about lr / n.
    Then the linear schedule runs from lr to 0 over the remaining steps."""
    lr, n = 1e-3, 4
    trainer = make_trainer("transformer", tok, tmp_path, iterations=3, learning_rate=lr,
                           warmup_steps=n, lr_schedule="linear")
    before = [p.detach().clone() for p in trainer.engine.params]
    seen: list[float] = []
    moves: list[float] = []

    def record_lr(optimizer, args, kwargs):
        seen.append(optimizer.param_groups[0]["lr"])

    def record_first_move(optimizer, args, kwargs):
        if not moves:
            moves.append(max(float((p.detach() - b).abs().max())
                             for p, b in zip(trainer.engine.params, before, strict=True)))

    trainer.engine.optimizer.register_step_pre_hook(record_lr)
    trainer.engine.optimizer.register_step_post_hook(record_first_move)
    trainer.train()
    assert moves[0] == pytest.approx(lr / n, rel=0.05)
    total = 3 * 2 * 2                           # iterations x epochs x minibatches
    expect = [lr * (i + 1) / n for i in range(n)]
    expect += [lr * (1 - i / (total - n)) for i in range(total - n)]
    assert seen == pytest.approx(expect)


def test_kl_in_loss_and_adaptive_coefficient(tok, tmp_path):
    trainer = make_trainer("transformer", tok, tmp_path, iterations=3, kl_mode="loss",
                           kl_estimator="k3", adaptive_kl=True, kl_target=0.01, kl_horizon=100,
                           learning_rate=1e-2)
    history = trainer.train()
    assert history[0]["kl_coef"] == pytest.approx(0.05)
    # KL above target grows beta by the clipped factor 1 + 0.2 * n / horizon at most.
    for prev, row in zip(history, history[1:], strict=False):
        factor = row["kl_coef"] / prev["kl_coef"]
        expect = 1 + max(min((prev["kl"] - 0.01) / 0.01, 0.2), -0.2) * 16 / 100
        assert factor == pytest.approx(expect)


def test_rewards_carry_score_at_last_token_and_kl_on_every_token(tok, tmp_path):
    trainer = make_trainer("transformer", tok, tmp_path, kl_coef=0.5)
    _, rollout = trainer.collect()
    # pretend the policy moved: a fixed per-token log-ratio of 0.1
    moved = type(rollout)(**{**rollout.__dict__,
                             "logprobs": rollout.ref_logprobs + 0.1 * rollout.response_mask})
    out = trainer.compute_advantages(moved)
    mask = moved.response_mask
    last = mask.sum(1).long() - 1
    expect = -0.5 * 0.1 * mask
    expect[torch.arange(16), last] += moved.scores
    assert torch.allclose(out.rewards, expect, atol=1e-6)
    assert torch.allclose(out.advantages[mask == 1].mean(), torch.tensor(0.0), atol=1e-5)


def test_non_finite_updates_are_skipped_then_stop(tok, tmp_path):
    trainer = make_trainer("transformer", tok, tmp_path, iterations=2, max_bad_updates=3)
    before = copy.deepcopy(trainer.policy.state_dict())
    # Inject a NaN gradient: a hook that poisons one weight's gradient.
    weight = next(trainer.policy.parameters())
    handle = weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(TrainingError, match="3 non-finite updates in a row"):
        trainer.train()
    handle.remove()
    after = trainer.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN update was applied"


def test_one_bad_update_is_skipped_and_counted(tok, tmp_path):
    trainer = make_trainer("transformer", tok, tmp_path, iterations=1, ppo_epochs=1)
    weight = next(trainer.policy.parameters())
    calls = {"n": 0}

    def poison_first(g):
        calls["n"] += 1
        return g * float("nan") if calls["n"] == 1 else g

    weight.register_hook(poison_first)
    history = trainer.train()
    assert history[0]["skipped_updates"] == 1.0
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def _epoch_kls(trainer) -> list[float]:
    """Run one iteration, recording each optimizer step's approx_kl; the mean per epoch."""
    steps: list[float] = []
    step = trainer.optimizer_step

    def recording(minibatch, advantages):
        out = step(minibatch, advantages)
        steps.append(out["approx_kl"])
        return out

    trainer.optimizer_step = recording
    history = trainer.train()
    per = trainer.config.num_minibatches
    assert len(steps) == history[0]["epochs_done"] * per
    return [float(np.mean(steps[i: i + per])) for i in range(0, len(steps), per)]


def test_early_stop_on_target_approx_kl(tok, tmp_path):
    """The epochs stop right after the first epoch whose mean approx KL exceeds the target,
    and not before: a target set between the epochs' KLs of a run without one (same seed, same
    updates up to the stop) stops that run at the first epoch above it."""
    kw = dict(iterations=1, ppo_epochs=8, learning_rate=5e-3)
    free = _epoch_kls(make_trainer("transformer", tok, tmp_path / "a", **kw))
    assert len(free) == 8
    target = max(free[:2])                     # not exceeded by epochs 1 and 2
    above = [e for e, kl in enumerate(free) if kl > target]
    assert above, free                          # the KL grows as the policy moves
    stopped = _epoch_kls(make_trainer("transformer", tok, tmp_path / "b",
                                      target_approx_kl=target, **kw))
    assert len(stopped) == above[0] + 1 >= 3
    np.testing.assert_allclose(stopped, free[: above[0] + 1], rtol=1e-5)


def test_nan_reward_inside_a_rollout_skips_every_update(tok, tmp_path):
    """A NaN that reaches the rollout (the env refuses one from the reward function itself)
    poisons the advantages; every update is skipped and counted, no weight changes."""
    trainer = make_trainer("transformer", tok, tmp_path, ppo_epochs=2, max_bad_updates=100)
    before = copy.deepcopy(trainer.policy.state_dict())
    _, rollout = trainer.collect()
    scores = rollout.scores.clone()
    scores[3] = float("nan")
    rollout = dataclasses.replace(rollout, scores=scores)
    advantages = trainer.compute_advantages(rollout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "mean of empty slice" from the statistics
        stats = trainer.update(rollout, advantages)
    assert stats["skipped_updates"] == 2 * trainer.config.num_minibatches
    assert math.isnan(stats["loss"])             # no applied step to average over
    after = trainer.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_exact_kl_in_the_loss(tok, tmp_path):
    trainer = make_trainer("transformer", tok, tmp_path, kl_mode="loss", kl_estimator="full",
                           kl_coef=0.5)
    _, rollout = trainer.collect()
    mask = rollout.response_mask
    B, T = mask.shape
    assert rollout.ref_dist is not None and rollout.ref_dist.shape == (B, T, len(tok))
    # The stored distribution gives the stored reference logprobs of the sampled tokens.
    tokens = rollout.input_ids[:, -T:]
    picked = rollout.ref_dist.gather(-1, tokens[..., None]).squeeze(-1) * mask
    assert torch.allclose(picked, rollout.ref_logprobs, atol=1e-5)
    adv = trainer.compute_advantages(rollout)
    assert (adv.rewards.sum(1) == rollout.scores).all()      # no KL in the rewards
    n = mask.sum()
    # Policy == reference: the KL term is 0. After moving the policy, the loss is the loss
    # without the term plus beta * the exact KL of the new distributions, per token.
    loss0, _ = trainer.loss(rollout, adv, n)
    trainer.config.kl_mode = "reward"   # the same loss without the KL term
    assert trainer.loss(rollout, adv, n)[0].item() == pytest.approx(loss0.item(), abs=1e-6)
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_plain, _ = trainer.loss(rollout, adv, n)
    trainer.config.kl_mode = "loss"
    loss_kl, _ = trainer.loss(rollout, adv, n)
    fwd = plain_forward(trainer.policy, rollout.input_ids, rollout.attention_mask, T, 1.0,
                        full_dist=True)
    kl = (full_kl(fwd.dist, rollout.ref_dist) * mask).sum() / n
    assert kl.item() > 1e-3
    assert loss_kl.item() == pytest.approx(loss_plain.item() + 0.5 * kl.item(), rel=1e-4)


def test_exact_kl_holds_the_policy_closer_to_the_reference(tok, tmp_path):
    kls = []
    for beta in (0.0, 2.0):
        trainer = make_trainer("transformer", tok, tmp_path / str(beta), iterations=4,
                               kl_mode="loss", kl_estimator="full", kl_coef=beta,
                               learning_rate=3e-3)
        trainer.train()
        _, rollout = trainer.collect()
        T = rollout.response_mask.shape[1]
        with torch.no_grad():
            fwd = plain_forward(trainer.policy, rollout.input_ids, rollout.attention_mask,
                                T, 1.0, full_dist=True)
        kl = full_kl(fwd.dist, rollout.ref_dist) * rollout.response_mask
        kls.append(float(kl.sum(1).mean()))
    # Measured 0.97 nats without the term and 0.24 with it.
    assert kls[1] < 0.5 * kls[0]


def test_prefix_shaping_is_a_baseline_of_the_score_so_far(tok, tmp_path):
    # With gamma = lam = 1, V = 0 and no KL, the advantage of token t is the return to go: the
    # final score unshaped, and score - phi(s_t) shaped, phi(s_t) the reward of the first t
    # tokens, which does not depend on the token chosen at t (so the expected gradient is the
    # same). count_a and a character tokenizer make phi easy to write down.
    trainer = make_trainer("transformer", tok, tmp_path, kl_coef=0.0, adaptive_kl=False,
                           lam=1.0, whiten_advantages=False)
    trainer.env.prefix_shaping = True
    episodes, rollout = trainer.collect()
    mask = rollout.response_mask
    rollout = dataclasses.replace(rollout, values=torch.zeros_like(mask))
    phi = torch.zeros_like(mask)
    response = rollout.input_ids[:, -mask.shape[1]:]
    for b in range(16):
        for t in range(1, int(mask[b].sum())):
            text = tok.decode(response[b, :t], skip_special_tokens=True)
            phi[b, t] = text.count("a") / 8
    shaped = trainer.compute_advantages(rollout)
    plain = trainer.compute_advantages(dataclasses.replace(rollout, token_scores=None))
    assert (phi > 0).any()
    assert torch.allclose(plain.advantages, rollout.scores[:, None] * mask)
    assert torch.allclose(shaped.advantages, (rollout.scores[:, None] - phi) * mask, atol=1e-6)
    assert torch.allclose(shaped.rewards.sum(1), rollout.scores, atol=1e-6)


def test_prefix_shaping_with_kl_and_whitened_rewards(tok, tmp_path):
    trainer = make_trainer("transformer", tok, tmp_path, kl_coef=0.5, whiten_rewards=True)
    trainer.env.prefix_shaping = True
    _, rollout = trainer.collect()
    mask = rollout.response_mask
    moved = dataclasses.replace(rollout, logprobs=rollout.ref_logprobs + 0.1 * mask)
    out = trainer.compute_advantages(moved)
    s = rollout.scores
    whitened = (s - s.mean()) / torch.sqrt(s.var() + 1e-8) + s.mean()
    # each token: -beta * KL + its increment / std; the rows add up to the whitened scores
    assert torch.allclose(out.rewards.sum(1), whitened - 0.5 * 0.1 * mask.sum(1), atol=1e-5)
    inner = mask.clone()
    inner[torch.arange(16), mask.sum(1).long() - 1] = 0     # all but the last token
    expect = (-0.05 + rollout.token_scores / torch.sqrt(s.var() + 1e-8)) * inner
    assert torch.allclose(out.rewards * inner, expect, atol=1e-6)


def frozen_trainer(kind, tok, path, reuse=True, reference=None, **overrides):
    from ppolm.policies.pretrained import freeze_lower_layers

    cfg = dict(iterations=1, batch_size=16, minibatch_size=8, ppo_epochs=2, seed=0,
               progress=False, output_dir=str(path), reuse_frozen_layers=reuse)
    cfg.update(overrides)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=8)
    policy = freeze_lower_layers(make_policy(kind, len(tok)), 1)     # layer 0 and embeddings
    return Trainer(policy, env, PPOConfig(**cfg), reference=reference)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("source", ["forward", "sampler"])
def test_frozen_lower_layers_run_once_per_rollout_with_the_same_numbers(tok, tmp_path,
                                                                         temperature, source):
    """The frozen layers' output, computed once (by a forward, or kept from the sampling pass),
    gives the numbers and gradients of the whole trunk run every time."""
    fast = frozen_trainer("llama", tok, tmp_path / "a", temperature=temperature,
                          rollout_logprobs=source)
    slow = frozen_trainer("llama", tok, tmp_path / "b", reuse=False, temperature=temperature,
                          rollout_logprobs="forward")
    assert (fast.engine.depth, fast.engine.ref_shares_bottom) == (1, True)
    assert slow.engine.depth == 0
    _, ra = fast.collect()
    _, rb = slow.collect()
    assert torch.equal(ra.input_ids, rb.input_ids) and (ra.attention_mask[:, 0] == 0).any()
    kept = fast.engine.kept_bottom
    assert slow.engine.kept_bottom is None and kept.shape == (*ra.input_ids.shape, 32)
    # Every position the sampler fed to the model (all but the last) holds trunk_bottom's output.
    bottom = fast.engine.view(fast.policy).trunk_bottom(ra.input_ids, ra.attention_mask, 1)
    real = ra.attention_mask[:, :-1].bool()
    assert torch.allclose(kept[:, :-1][real], bottom[:, :-1][real], atol=1e-5)
    tol = 1e-6 if source == "forward" else 1e-5
    for name in ("logprobs", "ref_logprobs", "values"):
        assert torch.allclose(getattr(ra, name), getattr(rb, name), atol=tol), name
    # No KL before any update (exactly 0 when the logprobs are recomputed).
    assert (ra.logprobs - ra.ref_logprobs).abs().max() <= (0.0 if source == "forward" else tol)
    aa, ab = fast.compute_advantages(ra), slow.compute_advantages(rb)
    idx = torch.arange(8, 16)
    mb_a, mb_b = ra.select(idx), rb.select(idx)
    _, stats = fast.loss(mb_a, aa.select(idx), mb_a.response_mask.sum())
    assert stats["ratio_max_dev"] < tol                            # first ratio 1
    with fast.engine.update(), slow.engine.update():
        fast.accumulate_gradients(mb_a, aa.select(idx))
        slow.accumulate_gradients(mb_b, ab.select(idx))
        fast.engine.buffers.densify()
        slow.engine.buffers.densify()
        grads = check_same_grads(fast, slow, tol)
    assert grads > 0


def check_same_grads(fast, slow, tol):
    grads = 0
    for (name, a), b in zip(fast.policy.named_parameters(), slow.policy.parameters(),
                            strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            grads += 1
            assert torch.allclose(a.grad, b.grad, atol=tol, rtol=1e-4), name
        assert "layers.0." not in name or a.grad is None           # the frozen layer
    return grads


def test_frozen_split_is_refused_where_it_would_change_the_numbers(tok, tmp_path):
    # GPT-2 adds position embeddings to inputs_embeds: the probe sees trunk_top(trunk_bottom)
    # differ from the trunk, so the trainer runs the whole trunk.
    gpt2 = frozen_trainer("gpt2", tok, tmp_path / "g")
    assert gpt2.engine.view(gpt2.policy).frozen_depth() == 1 and gpt2.engine.depth == 0
    # A reference with other lower weights keeps its own whole forward.
    torch.manual_seed(1)
    other = HFPolicy(tiny_llama(len(tok)))
    trainer = frozen_trainer("llama", tok, tmp_path / "r", reference=other)
    assert (trainer.engine.depth, trainer.engine.ref_shares_bottom) == (1, False)
    _, rollout = trainer.collect()
    ref = plain_forward(other, rollout.input_ids, rollout.attention_mask,
                        rollout.response_mask.shape[1], 1.0)
    assert torch.allclose(rollout.ref_logprobs, ref.logprobs * rollout.response_mask)


def test_a_view_that_cannot_record_its_split_gets_it_from_one_forward(tok, tmp_path):
    """A view with trunk_bottom/trunk_top but no trunk_and_bottom still reuses its policy's
    frozen layers with the sampler's logprobs: the rollout runs the lower layers once."""
    from ppolm.engines.fast_cpu.views import FastView, HFView
    from ppolm.policies.pretrained import freeze_lower_layers

    class NoRecord(HFView):
        trunk_and_bottom = FastView.trunk_and_bottom

    torch.manual_seed(0)
    policy = freeze_lower_layers(HFPolicy(tiny_llama(len(tok))), 1)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(count_a), max_new_tokens=8)
    trainer = Trainer(policy, env, PPOConfig(iterations=1, batch_size=16, minibatch_size=8,
                                             progress=False, output_dir=str(tmp_path)))
    assert trainer.engine.depth == 1
    view = trainer.engine.views[policy] = NoRecord(policy)
    assert not view.records_bottom
    episodes, rollout = trainer.collect()
    assert episodes.logprobs is not None
    assert torch.equal(trainer.engine.kept_bottom,
                       view.trunk_bottom(rollout.input_ids, rollout.attention_mask, 1))
    assert trainer.train()[0]["ratio_dev_first"] < 1e-5

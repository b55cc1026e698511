"""Dynamic sampling (DAPO) inside the Trainer: groups with no signal are never trained on, the
batch is full, the rounds are bounded, runs repeat under a seed and resume exactly; episodes
cut and joined; the overlong term and the log-probability mismatch in a real run."""

from __future__ import annotations

import warnings

import pytest
import torch

from ppolm import CallableReward, Callback, PPOConfig, TextGenerationEnv, Trainer, TransformerPolicy
from ppolm.maths.estimators import zero_signal_groups
from ppolm.rollout.batches import concat_episodes, select_episodes

PROMPTS = ["a", "abcdefg", "cd", "hij", "bbbbbbbbb", "jihg", "e", "fgfgf"]
FLAT = ("a", "cd", "e")        # prompts whose groups always score the same


def flat_or_count(prompts, responses):
    return [0.5 if p in FLAT else r.count("a") / 8 + r.count("b") / 16
            for p, r in zip(prompts, responses, strict=True)]


def make_trainer(tok, reward=flat_or_count, out=None, **overrides):
    torch.manual_seed(0)
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(reward), max_new_tokens=8, seed=0)
    cfg = dict(iterations=2, batch_size=16, minibatch_size=8, ppo_epochs=1, seed=0,
               samples_per_prompt=4, progress=False, advantage_estimator="grpo",
               dynamic_sampling=True, max_sampling_rounds=8, learning_rate=1e-3,
               output_dir=str(out) if out else None)
    return Trainer(TransformerPolicy(len(tok), hidden_size=32), env,
                   PPOConfig(**{**cfg, **overrides}))


def test_only_groups_with_a_signal_are_trained_on_and_the_batch_is_full(tok):
    trainer = make_trainer(tok)
    episodes, rollout = trainer.collect()
    assert len(episodes.prompts) == rollout.input_ids.shape[0] == 16
    assert not zero_signal_groups(episodes.scores, 4).any()
    assert not set(episodes.prompts) & set(FLAT)
    groups = [episodes.prompts[g * 4:(g + 1) * 4] for g in range(4)]
    assert all(len(set(g)) == 1 for g in groups)               # still one prompt per group
    stats = trainer.sampler.stats
    assert 2 <= stats["sampling_rounds"] <= 8                  # 3 of 8 prompts never have one
    sampled = stats["sampled_per_trained"] * 16
    assert sampled >= 16 + 4 * stats["groups_dropped"] and stats["groups_dropped"] >= 1
    row = trainer.iterate()
    assert row["zero_signal_groups"] == 0.0 and row["sampling_rounds"] >= 1
    # the policy's mean score is over every episode sampled, the flat groups' 0.5 included
    assert row["sampled_score_mean"] != row["score_mean"]


def test_rounds_are_bounded_and_the_batch_completed_with_a_warning(tok):
    trainer = make_trainer(tok, reward=lambda p, r: [1.0] * len(r), max_sampling_rounds=3)
    with pytest.warns(UserWarning, match="0 of 4 prompt groups had a signal after "
                                         "max_sampling_rounds=3"):
        episodes, _ = trainer.collect()
    assert len(episodes.prompts) == 16
    assert trainer.sampler.stats == {"sampling_rounds": 3.0, "groups_dropped": 12.0,
                                     "sampled_per_trained": 3.0, "sampled_score_mean": 1.0}


def test_two_runs_from_a_seed_are_identical(tok):
    rows, weights = [], []
    for _ in range(2):
        trainer = make_trainer(tok)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(trainer.train())
        weights.append({k: v.clone() for k, v in trainer.policy.state_dict().items()})
    assert [r["sampling_rounds"] for r in rows[0]] == [r["sampling_rounds"] for r in rows[1]]
    assert rows[0][-1]["score_mean"] == rows[1][-1]["score_mean"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class StopAfter(Callback):
    def on_iteration_end(self, trainer, row):
        return True                                            # stop after the first


def test_resume_is_exact(tok, tmp_path):
    whole = make_trainer(tok, out=tmp_path / "whole", iterations=3)
    whole.train()
    first = make_trainer(tok, out=tmp_path / "cut", iterations=3, save_every=1)
    first.callbacks.callbacks.insert(0, StopAfter())
    first.train()
    assert first.iteration == 1
    resumed = make_trainer(tok, out=tmp_path / "cut", iterations=3, save_every=1)
    resumed.resume()
    resumed.train()
    a, b = whole.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.history[-1]["sampling_rounds"] == resumed.history[-1]["sampling_rounds"]


def test_episodes_cut_and_joined_keep_every_real_token(tok):
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(flat_or_count), max_new_tokens=8)
    policy = TransformerPolicy(len(tok), hidden_size=32)
    g = torch.Generator().manual_seed(0)
    a = env.sample(policy, 4, 1.0, torch.device("cpu"), g, record=True)
    b = env.sample(policy, 8, 1.0, torch.device("cpu"), g, record=True)
    joined = concat_episodes([select_episodes(a, [2, 0]), b])
    assert joined.prompts == [a.prompts[2], a.prompts[0], *b.prompts]
    parts = [(a, 2), (a, 0), *[(b, i) for i in range(8)]]
    for row, (src, i) in enumerate(parts):
        real = joined.input_ids[row][joined.attention_mask[row].bool()]
        assert torch.equal(real, src.input_ids[i][src.attention_mask[i].bool()])
        n = int(src.response_mask[i].sum())
        assert torch.equal(joined.logprobs[row, :n], src.logprobs[i, :n])
        assert joined.scores[row] == src.scores[i]
    assert joined.hidden.shape[:2] == joined.response_mask.shape


def test_the_overlong_term_is_a_named_reward_part(tok):
    env = TextGenerationEnv(PROMPTS, tok, CallableReward(lambda p, r: [2.0] * len(r)),
                            max_new_tokens=8, ignore_eos=True, overlong_buffer=4)
    episodes = env.sample(TransformerPolicy(len(tok), hidden_size=32), 4, 1.0,
                          torch.device("cpu"))
    assert episodes.scores.tolist() == [1.0] * 4            # every response uses the budget
    assert episodes.reward_parts["overlong"] == -1.0
    with pytest.raises(Exception, match="overlong_buffer=9"):
        TextGenerationEnv(PROMPTS, tok, CallableReward(flat_or_count), max_new_tokens=8,
                          overlong_buffer=9)


@pytest.mark.parametrize("mode", ["sampler", "tis"])
def test_the_logprob_mismatch_is_logged(tok, mode):
    extra = {} if mode == "sampler" else dict(rollout_logprobs="forward", tis_cap=2.0)
    trainer = make_trainer(tok, dynamic_sampling=False, iterations=1, **extra)
    row = trainer.train()[-1]
    # the same model computing the same tokens: float rounding apart
    assert 0.0 <= row["logprob_mismatch_mean"] <= row["logprob_mismatch_max"] < 1e-4


@pytest.mark.slow
def test_two_ranks_each_fill_their_share_and_walk_the_same_prompts(tmp_path):
    """torchrun, 2 ranks (gloo): each rank trains on 8 episodes (2 groups) with a signal, the
    ranks sample the same number of rounds, consume the same prompts, and log the batch's
    figures (summed over the ranks)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "distributed" / "dynamic_worker.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(worker), str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        for batch in rank["trained"]:
            assert len(batch["prompts"]) == 8 and not any(batch["empty"])
            assert not set(batch["prompts"]) & set(FLAT)
    assert ranks[0]["env"] == ranks[1]["env"]
    a, b = ranks[0]["rows"], ranks[1]["rows"]
    for name in ("sampling_rounds", "groups_dropped", "sampled_per_trained", "score_mean"):
        assert [r[name] for r in a] == [r[name] for r in b], name
    assert all(r["zero_signal_groups"] == 0.0 for r in a)

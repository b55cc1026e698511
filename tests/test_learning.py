"""End to end: both built-in policies learn two toy tasks with a known optimum (1.0) to at
least 85% of it, with a fixed seed, through both engines (plain: torch as users know it;
fast_cpu: the single-process CPU engine). Every policy x engine pair is in the default suite on
target_char (seconds each) and lstm on continue; the transformer on continue (200 iterations,
about 3 minutes per engine on a 2-core CPU) is marked slow."""

from __future__ import annotations

import pytest
import torch

from ppolm import (
    LSTMPolicy,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    char_tokenizer,
)
from ppolm.rollout.tasks import make_task

# (policy, task) -> (iterations, batch size, learning rate, schedule, entropy coefficient).
# Found by a small sweep; for transformer/continue, last-5 mean score with 1e-3, linear decay,
# ent_coef 0.01: 0.82 / 0.98 / 0.96 (seeds 0, 1, 2) at 150 iterations, 0.96 / 0.99 (seeds 0, 1)
# at 200. The KL coefficient is small so that the KL-regularised optimum stays near the
# reward optimum. Over seeds 0-3 at 200 iterations, before and after the plain product in
# decoding steps changed the sampled trajectories' rounding, the best 5-iteration mean was
# 0.874-0.995: about half the runs settle on a plateau near 0.875 (a local optimum), so the bar
# is 85%.
REACH = 0.85
# With engine plain / fast_cpu (seed 0), best 5-iteration mean: transformer/target_char
# 1.00 / 0.97, lstm/target_char 1.00 / 1.00, lstm/continue 1.00 / 1.00, transformer/continue
# 0.87 / 0.98 (the plain run settles on the plateau near 0.875).
SETTINGS = {
    ("transformer", "target_char"): (40, 32, 1e-3, "constant", 0.0),
    ("lstm", "target_char"): (40, 32, 3e-3, "constant", 0.0),
    ("transformer", "continue"): (200, 64, 1e-3, "linear", 0.01),
    ("lstm", "continue"): (80, 64, 3e-3, "constant", 0.0),
}
SLOW = {("transformer", "continue")}
ENGINES = ["plain", "fast_cpu"]
CASES = [pytest.param(kind, task_name, engine, id=f"{kind}-{task_name}-{engine}",
                      marks=[pytest.mark.slow] if (kind, task_name) in SLOW else [])
         for kind, task_name in SETTINGS for engine in ENGINES]


@pytest.mark.parametrize("kind,task_name,engine", CASES)
def test_policy_learns_toy_task(kind, task_name, engine):
    iterations, batch, lr, schedule, ent_coef = SETTINGS[(kind, task_name)]
    torch.manual_seed(0)
    task = make_task(task_name)
    tok = char_tokenizer(task.alphabet)
    policy = (TransformerPolicy(len(tok), hidden_size=64) if kind == "transformer"
              else LSTMPolicy(len(tok), hidden_size=64))
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=task.max_new_tokens)
    config = PPOConfig(iterations=iterations, batch_size=batch, minibatch_size=batch // 4,
                       learning_rate=lr, lr_schedule=schedule, ent_coef=ent_coef,
                       kl_coef=0.01, seed=0, progress=False, engine=engine, device="cpu")
    trainer = Trainer(policy, env, config)
    assert trainer.engine.name == engine
    history = trainer.train()
    scores = [r["score_mean"] for r in history]
    windows = [sum(scores[i: i + 5]) / 5 for i in range(len(scores) - 4)]   # 5-iteration means
    assert windows[0] < 0.3, windows[0]             # random play is far from the optimum
    # It reaches 85% of the optimum (a 5-iteration mean, so not one lucky batch) and stays
    # near it to the end.
    assert max(windows) >= REACH * task.optimum, (windows[0], max(windows))
    assert windows[-1] >= 0.8 * task.optimum, windows[-1]

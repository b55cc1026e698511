"""Shared by best_of_n.py and value_probe.py: the base SmolLM2-135M-Instruct and an environment
that samples ``n`` responses (48 new tokens, VADER reward) to each of the first ``k`` movie-review
prompts of a split, in order: prompt i's samples are indices ``i * n .. i * n + n - 1``."""

from __future__ import annotations

from ppolm import HFPolicy, SentimentReward, TextGenerationEnv
from ppolm.policies.pretrained import chat_prompts, load_smollm2
from ppolm.rollout.tasks import movie_review_prompts


def repeated_prompts_env(split: str, k: int, n: int) -> tuple[HFPolicy, TextGenerationEnv]:
    policy, tok = load_smollm2()
    prompts = chat_prompts(tok, movie_review_prompts(split)[:k])
    repeated = [q for q in prompts for _ in range(n)]
    env = TextGenerationEnv(repeated, tok, SentimentReward(), max_new_tokens=48,
                            add_special_tokens=False, seed=0)
    return policy, env

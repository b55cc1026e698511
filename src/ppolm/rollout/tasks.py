"""Toy tasks with a known optimum, for tests, the CLI default and quick experiments; the
movie-review prompts of the SmolLM2 sentiment example; two-digit additions with a verifiable
reward."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppolm.rollout.interaction import Interaction
from ppolm.rollout.rewards import RewardFunction, SentimentReward

ALPHABET = "abcdefghij"


class TargetCharReward(RewardFunction):
    """Share of the first ``length`` response characters equal to ``target`` (optimum 1.0)."""

    def __init__(self, target: str = "a", length: int = 8) -> None:
        self.target, self.length = target, length

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [sum(c == self.target for c in r[: self.length]) / self.length for r in responses]


class ContinueSequenceReward(RewardFunction):
    """The prompt is a run of consecutive letters of ``alphabet`` (cyclic); the response should
    continue it for ``length`` characters. Score: share of positions that match (optimum 1.0).
    """

    def __init__(self, alphabet: str = ALPHABET, length: int = 6) -> None:
        self.alphabet, self.length = alphabet, length

    def target(self, prompt: str) -> str:
        start = self.alphabet.index(prompt[-1]) + 1
        n = len(self.alphabet)
        return "".join(self.alphabet[(start + i) % n] for i in range(self.length))

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            want = self.target(p)
            out.append(sum(a == b for a, b in zip(r, want, strict=False)) / self.length)
        return out


@dataclass(frozen=True)
class ToyTask:
    """Everything a toy run needs besides the policy."""

    name: str
    alphabet: str
    prompts: list[str]
    reward: RewardFunction
    max_new_tokens: int
    optimum: float
    interaction: Interaction | None = None      # multi-turn tasks: the environment's side
    max_turns: int = 1


def continue_prompts(alphabet: str = ALPHABET, length: int = 3) -> list[str]:
    """Every cyclic run of ``length`` consecutive letters: 'abc', 'bcd', ..., 'jab'."""
    n = len(alphabet)
    return ["".join(alphabet[(s + i) % n] for i in range(length)) for s in range(n)]


class SecretLookup(Interaction):
    """Each episode has a secret digit, told only to a model that asks for it: a first turn
    holding '?' gets the reply '=<secret>'; any other turn ends the episode. The information
    comes only from the environment: a policy succeeds only by asking and then using the
    answer."""

    def reset(self, prompt: str, rng: random.Random) -> dict[str, Any]:
        return {"secret": str(rng.randrange(10))}

    def reply(self, prompt: str, turns: list[str], state: dict[str, Any]) -> str | None:
        return "=" + state["secret"] if len(turns) == 1 and "?" in turns[0] else None


class SecretReward(RewardFunction):
    """1.0 when the model asked for the secret and its answer (the turn after the reply)
    starts with it, else 0.0: a guess without asking earns nothing."""

    def __call__(self, prompts: list[str], responses: list[str],
                 turns: list[list[str]] | None = None,
                 states: list[dict[str, Any]] | None = None, **columns: Any) -> list[float]:
        if turns is None or states is None:
            raise ValueError("SecretReward scores multi-turn episodes (interaction="
                             "SecretLookup()): it needs their turns and states.")
        return [float(len(t) == 2 and t[1][:1] == s["secret"])
                for t, s in zip(turns, states, strict=True)]


def make_task(name: str) -> ToyTask:
    """A built-in toy task by name: 'continue', 'target_char' or 'lookup' (two turns: ask
    for a secret digit, then answer it; see ``SecretLookup``)."""
    if name == "continue":
        return ToyTask("continue", ALPHABET, continue_prompts(), ContinueSequenceReward(length=6),
                       max_new_tokens=6, optimum=1.0)
    if name == "target_char":
        return ToyTask("target_char", ALPHABET, continue_prompts(), TargetCharReward("a", 8),
                       max_new_tokens=8, optimum=1.0)
    if name == "lookup":
        return ToyTask("lookup", "ab0123456789?=", ["a", "b", "ab", "ba"], SecretReward(),
                       max_new_tokens=2, optimum=1.0, interaction=SecretLookup(), max_turns=2)
    from ppolm.errors import ConfigError

    raise ConfigError(f"Unknown toy task {name!r}; use 'continue', 'target_char' or 'lookup'.")


DATA_DIR = Path(__file__).parent.parent / "data"


def movie_review_prompts(split: str = "train") -> list[str]:
    """Requests for a two-sentence review of a named movie, as plain user messages (wrap them
    with ``ppolm.policies.pretrained.chat_prompts`` for a chat model). 'train': 294 prompts;
    'eval': 64 held-out prompts about other movies."""
    from ppolm.errors import ConfigError
    from ppolm.rollout.env import read_prompts

    if split not in ("train", "eval"):
        raise ConfigError(f"movie_review_prompts split={split!r}: use 'train' or 'eval'.")
    return read_prompts(movie_review_path(split))


def movie_review_path(split: str) -> Path:
    """The file of ``movie_review_prompts(split)`` (one prompt per line)."""
    return DATA_DIR / f"movie_reviews_{split}.txt"


class ArithmeticReward(RewardFunction):
    """A verifiable reward: 1.0 when the response's answer is the sum the prompt asks for
    ("What is A + B?"), else 0.0. The answer is the first integer after the response's first
    '=' when it writes one ("37 + 48 = 85"), else its first integer. The ground truth is read
    from the prompt itself, so it works on chat-wrapped prompts too."""

    QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
    NUMBER = re.compile(r"-?\d[\d,]*")

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            asked = self.QUESTION.findall(p)
            if not asked:
                raise ValueError(f"no 'What is A + B?' question in the prompt {p[-80:]!r}")
            a, b = asked[-1]
            found = self.NUMBER.search(r, r.index("=") + 1 if "=" in r else 0)
            answer = int(found.group(0).replace(",", "")) if found else None
            out.append(1.0 if answer == int(a) + int(b) else 0.0)
        return out


def arithmetic_prompts(split: str = "train", n: int = 256, low: int = 1, high: int = 12
                       ) -> list[str]:
    """Additions of two integers in [low, high], "What is A + B? Reply with the number only."
    'train' and 'eval' are drawn from disjoint halves of a fixed shuffle of all pairs: the same
    lists on every call, no held-out question seen in training."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    random.Random(0).shuffle(pairs)
    half = pairs[: len(pairs) // 2] if split == "train" else pairs[len(pairs) // 2:]
    return [f"What is {a} + {b}? Reply with the number only." for a, b in half[:n]]


#: Reward classes the CLI knows by name.
BUILTIN_REWARDS: dict[str, type[RewardFunction]] = {
    "target_char": TargetCharReward,
    "continue": ContinueSequenceReward,
    "sentiment": SentimentReward,
    "arithmetic": ArithmeticReward,
}

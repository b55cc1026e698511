"""Reward functions: the one method a user writes, and the built-in rewards.

A reward function scores a batch: ``reward_fn(prompts, responses) -> list[float]``, one finite
float per response. ppolm checks what comes back and names the offending item when it is wrong.

When the prompts come from a table (``ppolm.rollout.prompts``), its other columns reach the
reward as keyword lists aligned with the responses, GRPO's convention:
``reward_fn(prompts, responses, target=[...], ...)``. A reward takes all of them with
``**columns``, or the ones it names; ``reward_columns`` decides once, from its signature, so a
reward written before columns existed keeps working where there are none.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ppolm.errors import RewardError


class RewardFunction(ABC):
    """Subclass and implement ``__call__``: a batch of prompts and responses -> scores.

    With prompts from a table, add ``**columns`` (or the column names you need) to receive
    its other columns, one value per response."""

    @abstractmethod
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One float per response, higher is better."""

    def parts(self) -> dict[str, float]:
        """Named components of the last batch's reward (mean of each), for logging."""
        return {}


class CallableReward(RewardFunction):
    """Wraps a plain function ``fn(prompts, responses) -> list[float]`` (or, with
    ``per_sample=True``, ``fn(prompt, response) -> float``)."""

    def __init__(self, fn: Callable[..., Any], per_sample: bool = False) -> None:
        if not callable(fn):
            raise RewardError(f"CallableReward needs a callable, got {fn!r}.")
        self.fn, self.per_sample = fn, per_sample

    def __call__(self, prompts: list[str], responses: list[str], **columns: list[Any]
                 ) -> list[float]:
        take = {k: columns[k] for k in reward_columns(self.fn, list(columns), strict=False)}
        if self.per_sample:
            return [self.fn(p, r, **{k: v[i] for k, v in take.items()})
                    for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        return self.fn(prompts, responses, **take)


class WeightedReward(RewardFunction):
    """A weighted sum of named rewards; the mean of each part is logged as ``reward/<name>``."""

    def __init__(self, parts: dict[str, tuple[RewardFunction, float]]) -> None:
        if not parts:
            raise RewardError("WeightedReward needs at least one (reward, weight) part.")
        self._parts = parts
        self._last: dict[str, float] = {}

    def __call__(self, prompts: list[str], responses: list[str], **columns: list[Any]
                 ) -> list[float]:
        total = torch.zeros(len(responses), dtype=torch.float64)
        self._last = {}
        for name, (fn, weight) in self._parts.items():
            take = {k: columns[k] for k in reward_columns(fn, list(columns), strict=False)}
            scores = check_scores(fn(prompts, responses, **take), prompts, source=name)
            self._last[name] = float(scores.mean())
            total += weight * scores
        return total.tolist()

    def parts(self) -> dict[str, float]:
        return dict(self._last)


class SequenceClassifierReward(RewardFunction):
    """Reward from a ``transformers`` sequence-classification model (e.g. a trained reward model).

    The score is the logit of ``label`` (num_labels=1 reward models: label 0), computed on
    ``prompt + response`` (or the response alone with ``include_prompt=False``), in batches.
    """

    def __init__(self, model: Any, tokenizer: Any, label: int = 0, include_prompt: bool = True,
                 batch_size: int = 32, max_length: int = 512) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.label, self.include_prompt = label, include_prompt
        self.batch_size, self.max_length = batch_size, max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str], **columns: list[Any]
                 ) -> list[float]:
        texts = [p + r if self.include_prompt else r for p, r in zip(prompts, responses,
                                                                      strict=True)]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i: i + self.batch_size], return_tensors="pt",
                                 padding=True, truncation=True, max_length=self.max_length)
            logits = self.model(**enc.to(device)).logits            # (b, num_labels)
            out.extend(logits[:, self.label].float().tolist())
        return out


class SentimentReward(RewardFunction):
    """VADER sentiment of the response: its compound score, in [-1, 1] (Hutto and Gilbert 2014).

    Rule-based and fast (well under a millisecond per response on a CPU), so it never slows a
    rollout. Compound > 0.05 is VADER's threshold for "positive", < -0.05 for "negative".
    Needs the ``vaderSentiment`` package (``pip install vaderSentiment``, or the ``smollm2``
    extra). With ``target="negative"`` the score is the negated compound.
    """

    def __init__(self, target: str = "positive") -> None:
        if target not in ("positive", "negative"):
            raise RewardError(f"SentimentReward target={target!r}: use 'positive' or 'negative'.")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise RewardError("SentimentReward needs the vaderSentiment package: "
                              "pip install vaderSentiment") from None
        self.analyzer = SentimentIntensityAnalyzer()
        self.sign = 1.0 if target == "positive" else -1.0

    def __call__(self, prompts: list[str], responses: list[str], **columns: list[Any]
                 ) -> list[float]:
        return [self.sign * float(self.analyzer.polarity_scores(r)["compound"])
                for r in responses]


def reward_columns(fn: Any, names: list[str], strict: bool = True) -> list[str]:
    """Which of the table columns ``names`` go to ``fn``: all of them when it takes
    ``**kwargs``, else those it names as parameters (after prompts and responses).

    Raises RewardError when ``fn`` needs a parameter that is no column, or (``strict``) when
    there are columns and ``fn`` takes none of them: the columns would be lost silently.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):          # a builtin without a readable signature
        params = []
    P = inspect.Parameter
    if any(p.kind is P.VAR_KEYWORD for p in params):
        return list(names)
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    extra = [p for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
             and p not in positional[:2]]       # the first two: prompts and responses
    missing = [p.name for p in extra if p.default is p.empty and p.name not in names]
    who = getattr(fn, "__qualname__", type(fn).__qualname__)
    if missing:
        raise RewardError(f"reward function {who} needs {missing}, which the prompts do not "
                          f"have as columns (columns: {names}).")
    taken = [n for n in names if n in {p.name for p in extra}]
    if strict and names and not taken:
        raise RewardError(
            f"reward function {who} does not accept the prompts' other columns {names}: add "
            "**columns to its signature (def __call__(self, prompts, responses, **columns)), "
            "or keep only the prompt column (dataset.select_columns(['prompt'])).")
    return taken


def check_scores(values: Any, prompts: Sequence[str], source: str = "reward function"
                 ) -> torch.Tensor:
    """Validate what a reward function returned: one finite real number per prompt.

    Returns a float64 tensor (B,). Raises RewardError naming the batch index and the prompt.
    """
    n = len(prompts)
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.shape[0] != n:
            raise RewardError(f"{source} returned a tensor of shape {tuple(values.shape)}; "
                              f"expected ({n},), one score per response.")
        values = values.detach().cpu().tolist()
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"{source} returned {type(values).__name__}; expected a list of "
                          f"{n} floats, one per response.")
    if len(values) != n:
        raise RewardError(f"{source} returned {len(values)} scores for {n} responses; "
                          "return exactly one float per response.")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"{source} returned {v!r} ({type(v).__name__}) at batch index {i} "
                              f"(prompt {prompts[i]!r}); scores must be real numbers.")
        if not math.isfinite(float(v)):
            raise RewardError(f"{source} returned {v} at batch index {i} (prompt {prompts[i]!r}); "
                              "scores must be finite.")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)

"""Reward functions: the one method a user writes, and the built-in rewards.

A reward function scores a batch: ``reward_fn(prompts, responses) -> list[float]``, one finite
float per response. ppolm checks what comes back and names the offending item when it is wrong.

When the prompts come from a table (``ppolm.rollout.prompts``), its other columns reach the
reward as keyword lists aligned with the responses, GRPO's convention:
``reward_fn(prompts, responses, target=[...], ...)``. A reward takes all of them with
``**columns``, or the ones it names; ``reward_columns`` decides once, from its signature, so a
reward written before columns existed keeps working where there are none. A reward that names
one of ``EPISODE_FIELDS`` gets it too (the response token ids, the prompt's chat messages).

A function written TRL's way, ``reward(completions, **kwargs)`` (every argument by keyword:
``prompts``, ``completions``, ``completion_ids`` and the columns), is told apart by its
signature (it names ``completions``, or takes no positional argument) and wrapped in a
``CompletionsReward``; a list of rewards becomes a ``WeightedReward`` (``as_reward``).
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

#: What the environment gives a reward that names it as a parameter, besides the table's
#: columns: each response's token ids (padding dropped, the end token kept when it ended, as
#: TRL's ``completion_ids``), and each prompt's chat messages when the prompt was given as a
#: message list (else None).
EPISODE_FIELDS = ("completion_ids", "prompt_messages")
#: The arguments TRL's GRPOTrainer gives every reward function by keyword (besides the columns).
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")
_P = inspect.Parameter


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


class CompletionsReward(RewardFunction):
    """A reward written TRL's way, ``fn(completions, **kwargs) -> list[float]``: called with
    every argument by keyword, those it takes of ``prompts``, ``completions``,
    ``completion_ids`` (each response's token ids) and the prompts' other columns (all of them
    with ``**kwargs``, as GRPOTrainer gives them; TRL's ``trainer_state`` is not given).

    With prompts given as chat message lists, the arguments are in TRL's conversational format:
    ``prompts`` the message lists, ``completions`` ``[[{"role": "assistant", "content": text}]]``;
    with string prompts (also with ``chat_template=True``) both are strings.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise RewardError(f"CompletionsReward needs a callable, got {fn!r}.")
        params = _parameters(fn)
        who = reward_name(fn)
        if any(p.kind is _P.POSITIONAL_ONLY for p in params):
            raise RewardError(f"reward function {who} has positional-only parameters; a reward "
                              "written TRL's way is called with keyword arguments only.")
        self.fn, self.name = fn, who
        self.takes_all = any(p.kind is _P.VAR_KEYWORD for p in params)
        self.named = [p.name for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD,
                                                           _P.KEYWORD_ONLY)]
        #: the parameters it must be given that are no TRL argument: columns of the prompts
        self.needs = [p.name for p in params if p.name in self.named and p.default is p.empty
                      and p.name not in TRL_ARGUMENTS]

    def __call__(self, prompts: list[str], responses: list[str],
                 completion_ids: list[list[int]] | None = None,
                 prompt_messages: list[Any] | None = None, **columns: list[Any]) -> list[float]:
        chat = bool(prompt_messages) and all(m is not None for m in prompt_messages or [])
        given: dict[str, Any] = {
            "prompts": prompt_messages if chat else prompts,
            "completions": ([[{"role": "assistant", "content": r}] for r in responses] if chat
                            else responses),
            "completion_ids": completion_ids, **columns}
        result: list[float] = self.fn(**{k: v for k, v in given.items()
                                         if self.takes_all or k in self.named})
        return result


class WeightedReward(RewardFunction):
    """A weighted sum of named rewards; the mean of each part is logged as ``reward/<name>``.
    Each part gets the columns (and ``EPISODE_FIELDS``) it names, as a reward alone would."""

    def __init__(self, parts: dict[str, tuple[RewardFunction, float]]) -> None:
        if not parts:
            raise RewardError("WeightedReward needs at least one (reward, weight) part.")
        self._parts = parts
        self._last: dict[str, float] = {}

    def __call__(self, prompts: list[str], responses: list[str],
                 completion_ids: list[list[int]] | None = None,
                 prompt_messages: list[Any] | None = None, **columns: list[Any]) -> list[float]:
        fields: dict[str, list[Any] | None] = {"completion_ids": completion_ids,
                                               "prompt_messages": prompt_messages}
        total = torch.zeros(len(responses), dtype=torch.float64)
        self._last = {}
        for name, (fn, weight) in self._parts.items():
            take: dict[str, Any] = {k: columns[k] for k in reward_columns(fn, list(columns),
                                                                          strict=False)}
            take.update({k: v for k in reward_fields(fn) if (v := fields[k]) is not None})
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


def as_reward(reward_fn: Any, weights: Sequence[float] | None = None) -> Any:
    """What an environment scores with, from what a user gives: a RewardFunction as it is; a
    function written TRL's way (see ``takes_completions``) wrapped in a ``CompletionsReward``;
    another callable as it is (called ``(prompts, responses, **columns)``); a list of rewards
    (TRL's ``reward_funcs``) as a ``WeightedReward`` named after each function, with
    ``weights`` (TRL's ``reward_weights``; default 1.0 each)."""
    if isinstance(reward_fn, (list, tuple)):
        if not reward_fn:
            raise RewardError("reward_fn is an empty list: give at least one reward function.")
        fns = [as_reward(f) for f in reward_fn]
        weights = [1.0] * len(fns) if weights is None else list(weights)
        if len(weights) != len(fns) or not all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)
                for w in weights):
            raise RewardError(f"reward_weights={weights!r}: give one finite number per reward "
                              f"function ({len(fns)}).")
        names: list[str] = []
        for f in fns:
            base = reward_name(f)
            names.append(base if base not in names else f"{base}_{len(names)}")
        return WeightedReward({n: (f, float(w)) for n, f, w in zip(names, fns, weights,
                                                                   strict=True)})
    if weights is not None:
        raise RewardError("reward_weights go with a list of reward functions "
                          "(reward_fn=[f, g], reward_weights=[1.0, 0.5]).")
    if callable(reward_fn) and not isinstance(reward_fn, RewardFunction) \
            and takes_completions(reward_fn):
        return CompletionsReward(reward_fn)
    return reward_fn


def takes_completions(fn: Any) -> bool:
    """Whether ``fn`` is a reward written TRL's way: it names a ``completions`` parameter, or
    takes every argument by keyword (no positional parameter)."""
    params = _parameters(fn)
    if not params:
        return False
    positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD,
                                                  _P.VAR_POSITIONAL)]
    return any(p.name == "completions" for p in params) or not positional


def reward_name(fn: Any) -> str:
    """The name a reward is logged under: its function's name, or its class's."""
    if isinstance(fn, CompletionsReward):
        return fn.name
    if isinstance(fn, CallableReward):
        fn = fn.fn
    return str(getattr(fn, "__name__", type(fn).__name__))


def reward_fields(fn: Any) -> list[str]:
    """Which of ``EPISODE_FIELDS`` ``fn`` names as parameters (``**kwargs`` does not count)."""
    named = {p.name for p in _parameters(fn)
             if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)}
    return [f for f in EPISODE_FIELDS if f in named]


def reward_columns(fn: Any, names: list[str], strict: bool = True) -> list[str]:
    """Which of the table columns ``names`` go to ``fn``: all of them when it takes
    ``**kwargs``, else those it names as parameters (after prompts and responses, and besides
    ``EPISODE_FIELDS``). The rewards a ``CallableReward``, ``CompletionsReward`` or
    ``WeightedReward`` wraps are checked as well, so a missing column is found before the
    first rollout.

    Raises RewardError when ``fn`` needs a parameter that is no column, or (``strict``) when
    there are columns and ``fn`` takes none of them: the columns would be lost silently.
    """
    clash = [n for n in names if n in EPISODE_FIELDS]
    if clash:
        raise RewardError(f"the prompts have columns {clash}, which ppolm gives the reward "
                          "itself (see ppolm.rollout.rewards.EPISODE_FIELDS); rename them.")
    who = reward_name(fn)
    if isinstance(fn, CallableReward):
        reward_columns(fn.fn, names, strict=False)
    elif isinstance(fn, WeightedReward):
        for part, _ in fn._parts.values():
            reward_columns(part, names, strict=False)
    elif isinstance(fn, CompletionsReward):
        missing = [n for n in fn.needs if n not in names]
        if missing:
            raise RewardError(f"reward function {who} needs {missing}, which the prompts do "
                              f"not have as columns (columns: {names}).")
        if strict and names and not fn.takes_all and not set(fn.named) & set(names):
            raise RewardError(
                f"reward function {who} does not accept the prompts' other columns {names}: "
                "add **kwargs to its signature, or keep only the prompt column "
                "(dataset.select_columns(['prompt'])).")
    params = _parameters(fn)
    if any(p.kind is _P.VAR_KEYWORD for p in params):
        return list(names)
    positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    extra = [p for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)
             and p not in positional[:2]       # the first two: prompts and responses
             and p.name not in EPISODE_FIELDS]
    missing = [p.name for p in extra if p.default is p.empty and p.name not in names]
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


def _parameters(fn: Any) -> list[inspect.Parameter]:
    """The parameters of ``fn`` (of its ``__call__`` for an object); none when it has no
    readable signature (a builtin)."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


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
                              f"(prompt {prompts[i]!r}); scores must be real numbers"
                              + (" (TRL's None for 'does not apply' is not taken: return a "
                                 "number, e.g. 0.0)." if v is None else "."))
        if not math.isfinite(float(v)):
            raise RewardError(f"{source} returned {v} at batch index {i} (prompt {prompts[i]!r}); "
                              "scores must be finite.")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)

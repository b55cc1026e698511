"""Evaluation on held-out prompts: reward, share positive, KL to the reference, length and
diversity, with a fixed sampling seed, for any policy and any reward function.

The figures (``EvalResult``):

- ``reward_mean``, ``reward_std``: the reward function's scores (no penalties added).
- ``positive_share``: share of responses whose score exceeds ``positive_threshold`` (0.05 is
  VADER's threshold for "positive").
- ``kl``: mean over responses of ``sum_t (log p(a_t) - log p_ref(a_t))`` over the response
  tokens (EOS included), at the sampling temperature: for responses sampled from the policy this
  is an unbiased estimate of KL(policy || reference) per response, in nats, the figure the
  trainer logs as ``kl`` (Ziegler et al. 2019 report the same).
- ``response_length``: mean response tokens (EOS included); ``eos_fraction``: share that ended.
- ``distinct_2``: distinct word bigrams / all word bigrams over all responses (Li et al. 2016).
- ``reward_se``, ``kl_se``: standard errors of the two means (std / sqrt(n)), how far a
  repeat with another sampling seed may land; ``samples_per_prompt`` responses per prompt
  shrink them by about its square root.

With ``samples_per_prompt = k`` the prompts are sampled k times over, in order (all prompts,
then all again...), with one generator: the first pass draws exactly the samples of ``k = 1``,
so a result with more samples contains the one-sample result as its first ``n / k`` samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppolm.engines.base import Engine, Sequences
from ppolm.engines.plain import PlainEngine
from ppolm.errors import DataError
from ppolm.maths.losses import sequence_kl
from ppolm.policies.base import Policy
from ppolm.rollout.env import TextGenerationEnv
from ppolm.rollout.interaction import Interaction


@dataclass(frozen=True)
class EvalSample:
    """One held-out prompt, the sampled response and its score."""

    prompt: str
    response: str
    reward: float
    kl: float | None


@dataclass(frozen=True)
class EvalResult:
    """The figures of one evaluation (see the module docstring) and its samples."""

    reward_mean: float
    reward_std: float
    positive_share: float
    kl: float | None            # None when no reference was given
    response_length: float
    eos_fraction: float
    distinct_2: float
    n: int
    seconds: float
    reward_se: float = 0.0
    kl_se: float | None = None
    samples_per_prompt: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    samples: list[EvalSample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalResult:
        samples = [EvalSample(**s) for s in values.get("samples", [])]
        return cls(**{**values, "samples": samples})

    def save(self, path: str | Path) -> None:
        """Write the result (figures, settings and every sample) as JSON."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all texts / all word n-grams (Li et al. 2016); words are the
    lower-cased whitespace-separated tokens. 0.0 when there is no n-gram at all."""
    if n <= 0:
        raise DataError(f"distinct_n needs n >= 1, got {n}.")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.lower().split()
        grams.extend(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def evaluate(policy: Policy, tokenizer: Any, prompts: list[str], reward_fn: Any,
             reference: Policy | None = None, *, max_new_tokens: int = 48,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 32, add_special_tokens: bool = True,
             positive_threshold: float = 0.05, samples_per_prompt: int = 1,
             out: str | Path | None = None, engine: Engine | None = None,
             interaction: Interaction | None = None, max_turns: int = 4,
             max_episode_tokens: int | None = None) -> EvalResult:
    """Sample ``samples_per_prompt`` responses per prompt (all prompts in order, then again;
    one generator seeded by ``seed``), score them, and measure the figures of the module
    docstring; write them to ``out`` (JSON) if given.

    The same seed, batch size and prompts give the same samples for the same policy, so a
    before/after comparison sees the same randomness. ``reference`` (e.g. the model before
    training) gives the KL figure (the policy's logprobs from the sampling pass, the
    reference's from a forward pass over the finished responses); the policy itself as its own
    reference gives a KL of 0 up to float rounding. ``engine``: the forward passes through
    it (a Trainer's ``trainer.engine``, set up with this policy and reference); default a
    ``PlainEngine`` on the policy's device. ``interaction``, ``max_turns``,
    ``max_episode_tokens``: multi-turn episodes, as ``TextGenerationEnv`` takes them (their
    generators seeded from ``seed``); the response length counts the model's tokens.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size={batch_size} must be > 0.")
    if samples_per_prompt < 1:
        raise DataError(f"samples_per_prompt={samples_per_prompt} must be >= 1.")
    n_prompts = len(prompts)
    prompts = list(prompts) * samples_per_prompt
    # Batches never straddle two passes, so the first pass samples as with one per prompt.
    batches = [list(range(k * n_prompts + start, k * n_prompts + min(start + batch_size,
                                                                      n_prompts)))
               for k in range(samples_per_prompt) for start in range(0, n_prompts, batch_size)]
    env = TextGenerationEnv(prompts, tokenizer, reward_fn, max_new_tokens=max_new_tokens,
                            top_k=top_k, top_p=top_p, add_special_tokens=add_special_tokens,
                            seed=seed, interaction=interaction, max_turns=max_turns,
                            max_episode_tokens=max_episode_tokens)
    env.check_policy(policy)
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    was_training = policy.training
    policy.eval()
    t0 = time.perf_counter()
    samples: list[EvalSample] = []
    lengths, ended = [], []
    engine = engine or PlainEngine(device, bf16=False)
    measure = reference is not None
    for idx in batches:
        with engine.rollout():
            ep = env.sample(policy, len(idx), temperature, device, generator, indices=idx,
                            record=measure, trunk=engine.sampling_trunk(policy))
            mask = ep.response_mask.float()                               # (B, T)
            kl = None
            if reference is not None:
                assert ep.logprobs is not None
                seqs = Sequences(ep.input_ids, ep.attention_mask, mask.shape[1])
                ref = engine.forward_response(reference, seqs, temperature)
                kl = sequence_kl(ep.logprobs.float(), ref.logprobs.float(), mask).tolist()
        for i in range(len(idx)):
            samples.append(EvalSample(ep.prompts[i], ep.responses[i], float(ep.scores[i]),
                                      kl[i] if kl is not None else None))
        lengths.extend(mask.sum(1).tolist())
        ended.extend(ep.ended.float().tolist())
    policy.train(was_training)
    scores = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    n = len(samples)
    kls = (torch.tensor([s.kl for s in samples], dtype=torch.float64)
           if reference is not None else None)
    result = EvalResult(
        reward_mean=float(scores.mean()),
        reward_std=float(scores.std()) if len(samples) > 1 else 0.0,
        positive_share=float((scores > positive_threshold).double().mean()),
        kl=float(kls.mean()) if kls is not None else None,
        response_length=sum(lengths) / len(lengths),
        eos_fraction=sum(ended) / len(ended),
        distinct_2=distinct_n([s.response for s in samples], 2),
        n=n, seconds=time.perf_counter() - t0,
        reward_se=float(scores.std()) / n ** 0.5 if n > 1 else 0.0,
        kl_se=(float(kls.std()) / n ** 0.5 if n > 1 else 0.0) if kls is not None else None,
        samples_per_prompt=samples_per_prompt,
        settings=dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, batch_size=batch_size,
                      positive_threshold=positive_threshold,
                      samples_per_prompt=samples_per_prompt),
        samples=samples)
    if out is not None:
        result.save(out)
    return result


#: (label, attribute, format, standard-error attribute) of each row of the comparison table.
_ROWS = (
    ("mean reward", "reward_mean", "{:.3f}", "reward_se"),
    ("share positive", "positive_share", "{:.1%}", None),
    ("KL to reference (nats/response)", "kl", "{:.2f}", "kl_se"),
    ("mean response length (tokens)", "response_length", "{:.1f}", None),
    ("responses ending with EOS", "eos_fraction", "{:.1%}", None),
    ("distinct-2", "distinct_2", "{:.3f}", None),
)


def format_table(results: dict[str, EvalResult]) -> str:
    """A Markdown table with one column per named result (e.g. {"before": a, "after": b});
    a mean measured over more than one sample per prompt shows its standard error (± se)."""
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, attr, fmt, se_attr in _ROWS:
        cells = []
        for name in names:
            res = results[name]
            value = getattr(res, attr)
            se = getattr(res, se_attr) if se_attr and res.samples_per_prompt > 1 else None
            cells.append("n/a" if value is None else fmt.format(value)
                         + ("" if se is None else " ± " + fmt.format(se)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_pairs(before: EvalResult, after: EvalResult, k: int = 5,
                 labels: list[str] | None = None) -> str:
    """The first ``k`` prompts with their responses before and after, as Markdown (from the
    first pass over the prompts when there are several samples per prompt).

    ``labels`` replace the prompts in the output (e.g. the user requests without the chat
    template)."""
    out = []
    k = min(k, before.n // before.samples_per_prompt)
    for i, (b, a) in enumerate(list(zip(before.samples, after.samples, strict=False))[:k]):
        if b.prompt != a.prompt:
            raise DataError("format_pairs needs two evaluations over the same prompts.")
        title = labels[i] if labels is not None else b.prompt.strip()
        out.append(f"**{title}**\n\n"
                   f"- before ({b.reward:+.2f}): {b.response.strip()}\n"
                   f"- after ({a.reward:+.2f}): {a.response.strip()}\n")
    return "\n".join(out)

"""TextGenerationEnv: prompts -> sampled responses -> scores.

The environment owns the prompts, their order, the tokenizer, the reward function and the
sampling settings except the temperature, which belongs to PPOConfig because training must use
the same one (the Trainer passes it in).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ppolm.errors import DataError, RewardError
from ppolm.policies.base import Policy
from ppolm.rollout.rewards import RewardFunction, check_scores
from ppolm.rollout.sampling import generate
from ppolm.rollout.types import Episodes


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.txt`` (one per line; ``\\n`` escapes a newline inside a prompt),
    ``.jsonl`` (one object with a "prompt" key per line) or ``.json`` (a list of strings)."""
    import json

    p = Path(path)
    if not p.is_file():
        raise DataError(f"Prompts file {str(p)!r} does not exist.")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read prompts file {str(p)!r}: {e}") from None
    try:
        if p.suffix == ".json":
            prompts = json.loads(text)
            if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                raise DataError(f"{str(p)!r} must hold a JSON list of strings.")
            return prompts
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
                raise DataError(f"each line of {str(p)!r} must be an object with a string "
                                "'prompt' field.")
            return [r["prompt"] for r in rows]
    except json.JSONDecodeError as e:
        raise DataError(f"Prompts file {str(p)!r} is not valid JSON: {e}") from None
    if p.suffix not in (".txt", ""):
        raise DataError(f"Prompts file {str(p)!r}: use .txt (one per line), .jsonl or .json.")
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


class TextGenerationEnv:
    """Samples responses to prompts from a policy and scores them.

    Args:
        prompts: a list of prompt strings, or the path of a prompts file (see ``read_prompts``).
        tokenizer: a ``transformers`` tokenizer; used left-padded. One with no pad token gets
            its EOS token as pad token.
        reward_fn: a RewardFunction (or any callable ``(prompts, responses) -> list[float]``).
        max_new_tokens: longest response.
        top_k, top_p: sampling filters (0 and 1.0 keep every token).
        missing_eos_penalty: added to the score of a response that never emitted EOS
            (e.g. -1.0); None for no penalty.
        ignore_eos: sample exactly ``max_new_tokens`` tokens for every prompt: EOS is then an
            ordinary token that does not end the response (benchmarks, fixed-length tasks).
        add_special_tokens: let the tokenizer add its BOS etc. to the prompts.
        seed: seed of the prompt order (a new shuffle every pass over the prompts).
        prefix_shaping: also score every prefix of each response and hand the trainer the
            score's increments, token by token (``Episodes.token_scores``): potential-based
            reward shaping (Ng et al. 1999) with the reward of the text so far as potential.
            The increments of a response add up to its score exactly, so the objective is
            unchanged; credit reaches the tokens that moved the score. The reward function is
            then called on about ``B x T`` texts per batch: cheap for rule or lexicon rewards
            (VADER), costly for a reward model.
    """

    def __init__(self, prompts: list[str] | str | Path, tokenizer: Any,
                 reward_fn: RewardFunction | Any, max_new_tokens: int = 16, top_k: int = 0,
                 top_p: float = 1.0, missing_eos_penalty: float | None = None,
                 add_special_tokens: bool = True, seed: int = 0, ignore_eos: bool = False,
                 prefix_shaping: bool = False) -> None:
        if isinstance(prompts, (str, Path)):
            prompts = read_prompts(prompts)
        if not isinstance(prompts, list) or not prompts:
            raise DataError("prompts must be a non-empty list of strings (or a prompts file).")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise DataError(f"prompt {i} is {p!r}: every prompt must be a non-empty string.")
        if max_new_tokens <= 0:
            raise DataError(f"max_new_tokens={max_new_tokens} must be > 0.")
        if top_k < 0 or not 0 < top_p <= 1:
            raise DataError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1].")
        if not callable(reward_fn):
            raise RewardError(f"reward_fn must be a RewardFunction, got {reward_fn!r}.")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise DataError("the tokenizer has neither a pad nor an EOS token; set one.")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.prompts, self.tokenizer, self.reward_fn = prompts, tokenizer, reward_fn
        self.max_new_tokens, self.top_k, self.top_p = max_new_tokens, top_k, top_p
        self.missing_eos_penalty = missing_eos_penalty
        self.ignore_eos, self.prefix_shaping = ignore_eos, prefix_shaping
        self.prompt_ids: list[list[int]] = tokenizer(
            prompts, add_special_tokens=add_special_tokens)["input_ids"]
        for i, ids in enumerate(self.prompt_ids):
            if not ids:
                raise DataError(f"prompt {i} ({prompts[i]!r}) tokenizes to no tokens.")
        self._order_gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(prompts), generator=self._order_gen).tolist()
        self._pos = 0

    # --- prompt order (part of the resumable state) -------------------------------------------
    def next_indices(self, n: int) -> list[int]:
        """The next ``n`` prompt indices; reshuffles after each full pass."""
        out: list[int] = []
        while len(out) < n:
            if self._pos == len(self._order):
                self._order = torch.randperm(len(self.prompts), generator=self._order_gen).tolist()
                self._pos = 0
            out.append(self._order[self._pos])
            self._pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self._order), "pos": self._pos,
                "gen": self._order_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order, self._pos = list(state["order"]), int(state["pos"])
        self._order_gen.set_state(state["gen"])

    # --- the work ------------------------------------------------------------------------------
    def check_policy(self, policy: Policy) -> None:
        """Refuse a policy whose vocabulary or context the prompts do not fit."""
        top = max(max(ids) for ids in self.prompt_ids)
        special = [t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
                   if t is not None]
        if max([top, *special]) >= policy.vocab_size:
            raise DataError(f"the tokenizer produces id {max([top, *special])} but the policy's "
                            f"vocabulary has {policy.vocab_size} entries: they disagree.")
        if policy.max_length is not None:
            for i, ids in enumerate(self.prompt_ids):
                if len(ids) + self.max_new_tokens > policy.max_length:
                    raise DataError(
                        f"prompt {i} ({self.prompts[i][:40]!r}...) has {len(ids)} tokens; with "
                        f"max_new_tokens={self.max_new_tokens} it exceeds the policy's context "
                        f"of {policy.max_length}. Shorten it or lower max_new_tokens.")

    def sample(self, policy: Policy, n: int, temperature: float, device: torch.device,
               generator: torch.Generator | None = None, indices: list[int] | None = None,
               record: bool = False, depth: int = 0) -> Episodes:
        """Sample one response for each of the next ``n`` prompts and score them.

        With ``indices``, use those prompts instead (``n`` is then ignored and the prompt order
        is left untouched), as an evaluation over a fixed set does. ``record`` and ``depth``:
        also return the sampler's logprobs, states and frozen-layer output (see
        ``ppolm.rollout.sampling.generate``)."""
        idx = list(indices) if indices is not None else self.next_indices(n)
        prompts = [self.prompts[i] for i in idx]
        enc = self.tokenizer.pad({"input_ids": [self.prompt_ids[i] for i in idx]},
                                 return_tensors="pt")
        query = enc["input_ids"].to(device)                              # (B, P)
        query_mask = enc["attention_mask"].to(device)                    # (B, P)
        out = generate(
            policy, query, query_mask, self.max_new_tokens,
            None if self.ignore_eos else self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id, temperature, self.top_k, self.top_p, generator,
            record=record, depth=depth)
        response, response_mask = out.tokens, out.mask
        eos = self.tokenizer.eos_token_id
        ended = ((response == eos) & response_mask.bool()).any(1)        # (B,)
        texts = self.decode(response, response_mask)
        t0 = time.perf_counter()
        # Prefixes first: a reward's parts() then describe the whole responses.
        potentials = (self.prefix_scores(prompts, response, response_mask)
                      if self.prefix_shaping else None)
        scores = self.score(prompts, texts)
        reward_seconds = time.perf_counter() - t0
        if self.missing_eos_penalty is not None:
            scores = scores + self.missing_eos_penalty * (~ended).to(scores.dtype).cpu()
        token_scores = None
        if potentials is not None:
            token_scores = score_increments(potentials, scores, response_mask.cpu()).float()
        return Episodes(
            prompts=prompts, responses=texts,
            input_ids=torch.cat([query, response], 1),
            attention_mask=torch.cat([query_mask, response_mask], 1),
            response_mask=response_mask, scores=scores.float().to(device), ended=ended,
            reward_parts=self.reward_parts(), reward_seconds=reward_seconds,
            token_scores=token_scores.to(device) if token_scores is not None else None,
            logprobs=out.logprobs, hidden=out.hidden, bottom=out.bottom)

    def prefix_scores(self, prompts: list[str], response: Tensor, response_mask: Tensor
                      ) -> Tensor:
        """The reward of every proper prefix of each response: ``phi[b, t]`` is the score of the
        text of its first ``t`` tokens (EOS dropped), for ``1 <= t < n_b`` (``n_b`` its tokens);
        0 elsewhere. All prefixes go to the reward function in one call.

        Shapes: response, response_mask (B, T) -> phi (B, T) float64."""
        eos = self.tokenizer.eos_token_id
        where: list[tuple[int, int]] = []
        items: list[tuple[str, str]] = []
        for b, (ids, m) in enumerate(zip(response.tolist(), response_mask.tolist(),
                                         strict=True)):
            n = int(sum(m))
            for t in range(1, n):
                where.append((b, t))
                items.append((prompts[b], self.tokenizer.decode(
                    [i for i in ids[:t] if i != eos], skip_special_tokens=True)))
        phi = torch.zeros(response.shape, dtype=torch.float64)
        if items:
            values = self.score([p for p, _ in items], [r for _, r in items])
            rows, cols = zip(*where, strict=True)
            phi[list(rows), list(cols)] = values
        return phi

    def decode(self, response: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Response texts, cut before EOS, special tokens dropped."""
        eos = self.tokenizer.eos_token_id
        out = []
        for ids, m in zip(response.tolist(), response_mask.tolist(), strict=True):
            ids = [t for t, keep in zip(ids, m, strict=True) if keep and t != eos]
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Call the reward function and validate what it returns. Shapes: -> (B,) float64."""
        try:
            values = self.reward_fn(prompts, responses)
        except Exception as e:
            raise self._locate_failure(prompts, responses, e) from e
        return check_scores(values, prompts)

    def _locate_failure(self, prompts: list[str], responses: list[str], err: Exception
                        ) -> RewardError:
        """Find the first item the reward function fails on, to name it in the error."""
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                self.reward_fn([p], [r])
            except Exception as e:  # the item that fails on its own
                return RewardError(f"reward function raised {type(e).__name__}: {e} at batch "
                                   f"index {i} (prompt {p!r}, response {r!r}).")
        return RewardError(f"reward function raised {type(err).__name__}: {err} on a batch of "
                           f"{len(prompts)} (first prompt {prompts[0]!r}).")

    def reward_parts(self) -> dict[str, float]:
        parts = getattr(self.reward_fn, "parts", None)
        return parts() if callable(parts) else {}


def score_increments(phi: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards from prefix scores: token ``t`` gets ``phi[t + 1] - phi[t]``, with
    ``phi[0] = 0`` (the empty response) and the response's own score in place of ``phi[n]``
    (``n`` its last token + 1). They add up to ``scores`` exactly. This is potential-based
    shaping, ``F = Phi(s') - Phi(s)`` with ``Phi`` = the reward of the text so far (0 at the
    start and after the end), so the optimal policy is unchanged (Ng et al. 1999).

    Shapes: phi (B, T) from ``prefix_scores``, scores (B,), mask (B, T) -> (B, T); 0 on padding.
    """
    m = mask.to(phi.dtype)
    last = (m * torch.arange(m.shape[1])).argmax(1)                     # (B,)
    nxt = torch.cat([phi[:, 1:], torch.zeros_like(phi[:, :1])], 1)      # phi[t + 1]   (B, T)
    nxt = nxt.scatter(1, last[:, None], scores.to(phi.dtype)[:, None])  # the score at the end
    return (nxt - phi) * m

"""TextGenerationEnv: prompts -> sampled responses -> scores.

The environment owns the prompts, their order, the tokenizer, the reward function and the
sampling settings that shape a response (max_new_tokens, top_k, top_p, stop_token_ids); the
temperature and samples_per_prompt belong to PPOConfig because training computes with them (the
Trainer passes them in). All six are checked by ``ppolm.config.sampling``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ppolm.config.sampling import check_missing_eos_penalty, check_overlong, check_sampling
from ppolm.errors import ConfigError, DataError, RewardError
from ppolm.maths.rewards import overlong_penalty, score_increments, turn_token_scores
from ppolm.policies.base import Policy
from ppolm.rollout.interaction import Interaction
from ppolm.rollout.multi_turn import MultiTurn, SamplingSettings, run_turns
from ppolm.rollout.prompts import prompt_set
from ppolm.rollout.prompts import read_prompts as read_prompts  # re-exported
from ppolm.rollout.rewards import (
    RewardFunction,
    as_reward,
    check_scores,
    reward_columns,
    reward_fields,
)
from ppolm.rollout.sampling import StepTrunk, generate
from ppolm.rollout.types import Episodes


class TextGenerationEnv:
    """Samples responses to prompts from a policy and scores them.

    Args:
        prompts: a list of prompt strings or chat message lists; a ``datasets.Dataset`` with a
            ``prompt`` column of either (its other columns reach the reward as keyword lists
            aligned with the responses); or the path of a prompts file (.txt, .json, .jsonl,
            .parquet, .csv), a dataset folder or a name ``datasets.load_dataset`` finds
            locally. See ``ppolm.rollout.prompts``.
        tokenizer: a ``transformers`` tokenizer; used left-padded. One with no pad token gets
            its EOS token as pad token.
        reward_fn: a RewardFunction (or any callable ``(prompts, responses) -> list[float]``);
            a function written TRL's way (``reward(completions, **kwargs)``); or a list of
            them, summed with ``reward_weights`` (keyword only; default 1.0 each) and logged
            part by part as ``reward/<function name>``. See ``ppolm.rollout.rewards``.
        max_new_tokens: longest response.
        top_k, top_p: sampling filters (0 and 1.0 keep every token).
        missing_eos_penalty: a non-negative amount SUBTRACTED from the score of a response that
            never emitted an end token (e.g. 1.0: such a response scores 1.0 less), as TRL's
            field of the same name; None for no penalty. A negative value is refused.
        ignore_eos: sample exactly ``max_new_tokens`` tokens for every prompt: EOS is then an
            ordinary token that does not end the response (benchmarks, fixed-length tasks).
        stop_token_ids: more ids that end a response, besides the tokenizer's EOS (keyword
            only). The ids in the policy's ``model.generation_config.eos_token_id`` (an int or a
            list of ints; Hugging Face models, e.g. chat models with an end-of-turn token) end
            it too; see ``stop_ids``. A response ends at the first of them; it is a response
            token, and is left out of the text.
        add_special_tokens: let the tokenizer add its BOS etc. to string prompts.
        chat_template: wrap each string prompt as a user message in the tokenizer's chat
            template (keyword only; message-list prompts always go through it).
        seed: seed of the prompt order (a new shuffle every pass over the prompts).
        prefix_shaping: also score every prefix of each response and hand the trainer the
            score's increments, token by token (``Episodes.token_scores``): potential-based
            reward shaping (Ng et al. 1999) with the reward of the text so far as potential.
            The increments of a response add up to its score exactly, so the objective is
            unchanged; credit reaches the tokens that moved the score. The reward function is
            then called on about ``B x T`` texts per batch: cheap for rule or lexicon rewards
            (VADER), costly for a reward model.
        interaction: an ``Interaction`` answering each model turn (keyword only; None: one
            turn). The episode is then the whole transcript after the prompt, model turns and
            replies as token ids, trained on the model's tokens only; the reward gets the
            transcript as ``responses``, and ``turns`` / ``states`` if it names them. See
            ``ppolm.rollout.multi_turn`` and docs/multi-turn.md.
        max_turns: the most model turns of an episode (with an interaction).
        max_episode_tokens: the most tokens after the prompt (with an interaction; default
            ``max_turns * (max_new_tokens + 256)``); an episode that would pass it ends,
            flagged truncated.
        overlong_buffer: DAPO's soft overlong punishment (keyword only; None: off): a reward
            term 0 up to ``max_new_tokens - overlong_buffer`` response tokens (the model's
            tokens of the episode with an interaction, against its budget), then falling
            linearly to ``-overlong_penalty`` at the budget; added to the score and logged as
            ``reward/overlong`` (``ppolm.maths.rewards.overlong_penalty``).
        overlong_penalty: the size of that term at the budget (default 1.0).
    """

    def __init__(self, prompts: Any, tokenizer: Any,
                 reward_fn: RewardFunction | Any, max_new_tokens: int = 16, top_k: int = 0,
                 top_p: float = 1.0, missing_eos_penalty: float | None = None,
                 add_special_tokens: bool = True, seed: int = 0, ignore_eos: bool = False,
                 prefix_shaping: bool = False, *, stop_token_ids: list[int] | None = None,
                 chat_template: bool = False, reward_weights: list[float] | None = None,
                 interaction: Interaction | None = None,
                 max_turns: int = 4, max_episode_tokens: int | None = None,
                 overlong_buffer: int | None = None, overlong_penalty: float = 1.0) -> None:
        # checked as a run's YAML is (one place for both), raised as DataError as before
        self.stop_token_ids = check_sampling(
            {"max_new_tokens": max_new_tokens, "top_k": top_k, "top_p": top_p,
             "stop_token_ids": stop_token_ids}, error=DataError)["stop_token_ids"]
        missing_eos_penalty = check_missing_eos_penalty(missing_eos_penalty, error=DataError)
        reward_fn = as_reward(reward_fn, reward_weights)
        if not callable(reward_fn):
            raise RewardError(f"reward_fn must be a RewardFunction, got {reward_fn!r}.")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise DataError("the tokenizer has neither a pad nor an EOS token; set one.")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.turns = (None if interaction is None else MultiTurn(
            interaction, tokenizer, max_new_tokens, max_turns, max_episode_tokens, seed))
        if self.turns is not None and prefix_shaping:
            raise ConfigError("prefix_shaping scores prefixes of one response; it does not "
                              "apply to multi-turn episodes (use Reply(text, reward=...) for "
                              "rewards during the episode).")
        found = prompt_set(prompts, tokenizer, add_special_tokens, chat_template,
                           self.turns.interaction.tool_schemas() if self.turns else None)
        self.prompts, self.tokenizer, self.reward_fn = found.texts, tokenizer, reward_fn
        self.prompt_ids, self.columns = found.ids, found.columns        # columns: (N,) lists
        self.prompt_messages = found.messages                            # (N,) lists or None
        self.reward_fields = reward_fields(reward_fn)          # EPISODE_FIELDS it names
        # the columns the reward takes, decided once from its signature
        self.reward_columns = (reward_columns(reward_fn, list(found.columns))
                               if self.turns is None else
                               self.turns.reward_columns(reward_fn, list(found.columns)))
        self.max_new_tokens, self.top_k, self.top_p = max_new_tokens, top_k, top_p
        self.missing_eos_penalty = missing_eos_penalty
        self.ignore_eos, self.prefix_shaping = ignore_eos, prefix_shaping
        self.overlong = check_overlong(overlong_buffer, overlong_penalty, self.max_model_tokens)
        self.overlong_mean: float | None = None      # the last batch's mean term (logged)
        self._order_gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(self.prompts), generator=self._order_gen).tolist()
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
                "gen": self._order_gen.get_state(),
                "episodes": self.turns.episodes if self.turns is not None else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order, self._pos = list(state["order"]), int(state["pos"])
        self._order_gen.set_state(state["gen"])
        if self.turns is not None:      # the episodes' generators go on where they were
            self.turns.episodes = int(state.get("episodes", 0))

    @property
    def max_model_tokens(self) -> int:
        """The most tokens the policy samples in one episode."""
        return self.max_new_tokens if self.turns is None else self.turns.max_model_tokens

    # --- the work ------------------------------------------------------------------------------
    def stop_ids(self, policy: Policy | None = None) -> list[int]:
        """The ids that end a response, sorted: the tokenizer's EOS, ``stop_token_ids``, and
        the ids of ``policy.model.generation_config.eos_token_id`` when the policy has one (an
        int or a list of ints)."""
        ids = set(self.stop_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        ids.update(generation_eos_ids(policy))
        return sorted(ids)

    def check_policy(self, policy: Policy) -> None:
        """Refuse a policy whose vocabulary or context the prompts do not fit."""
        top = max(max(ids) for ids in self.prompt_ids)
        special = [t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
                   if t is not None]
        if max([top, *special]) >= policy.vocab_size:
            raise DataError(f"the tokenizer produces id {max([top, *special])} but the policy's "
                            f"vocabulary has {policy.vocab_size} entries: they disagree.")
        outside = [t for t in self.stop_token_ids if t >= policy.vocab_size]
        if outside:
            raise DataError(f"stop_token_ids {outside} are outside the policy's vocabulary of "
                            f"{policy.vocab_size} entries (ids 0 to {policy.vocab_size - 1}).")
        if policy.max_length is not None:
            for i, ids in enumerate(self.prompt_ids):
                if len(ids) + self.max_new_tokens > policy.max_length:
                    raise DataError(
                        f"prompt {i} ({self.prompts[i][:40]!r}...) has {len(ids)} tokens; with "
                        f"max_new_tokens={self.max_new_tokens} it exceeds the policy's context "
                        f"of {policy.max_length}. Shorten it or lower max_new_tokens.")

    def sample(self, policy: Policy, n: int, temperature: float, device: torch.device,
               generator: torch.Generator | None = None, indices: list[int] | None = None,
               record: bool = False, trunk: StepTrunk | None = None,
               samples_per_prompt: int = 1, share: tuple[int, int] | None = None) -> Episodes:
        """Sample ``n`` responses and score them: one for each of the next ``n`` prompts, or,
        with ``samples_per_prompt`` = k, k for each of the next ``n / k`` prompts, a prompt's
        k episodes side by side (a group).

        With ``indices``, use those prompts instead (``n`` and ``samples_per_prompt`` are then
        ignored and the prompt order is left untouched), as an evaluation over a fixed set does.
        ``record``: also return the sampler's logprobs and states; ``trunk``: the decoding
        steps' trunk (see ``ppolm.rollout.sampling.generate``). ``share``: under torchrun, (the
        first of these episodes in the batch, the batch's episodes), so that each multi-turn
        episode's generator is seeded from its place in the whole run (see
        ``MultiTurn.start``)."""
        k = samples_per_prompt
        if k < 1 or n % k:
            raise DataError(f"n={n} episodes is not a whole number of groups of "
                            f"samples_per_prompt={k}.")
        idx = (list(indices) if indices is not None else
               [i for i in self.next_indices(n // k) for _ in range(k)])
        prompts = [self.prompts[i] for i in idx]
        columns = self.columns_at(idx)
        enc = self.tokenizer.pad({"input_ids": [self.prompt_ids[i] for i in idx]},
                                 return_tensors="pt")
        query = enc["input_ids"].to(device)                              # (B, P)
        query_mask = enc["attention_mask"].to(device)                    # (B, P)
        stops = self.stop_ids(policy)
        if self.turns is not None:
            return self.sample_turns(policy, idx, query, query_mask, stops, temperature,
                                     generator, record, share)
        out = generate(
            policy, query, query_mask, self.max_new_tokens,
            None if self.ignore_eos else stops,
            self.tokenizer.pad_token_id, temperature, self.top_k, self.top_p, generator,
            record=record, trunk=trunk)
        response, response_mask = out.tokens, out.mask
        stop_ids = torch.tensor(stops, dtype=torch.long, device=response.device)
        ended = (torch.isin(response, stop_ids) & response_mask.bool()).any(1)  # (B,)
        texts = self.decode(response, response_mask, stops)
        if "completion_ids" in self.reward_fields:
            columns["completion_ids"] = [[t for t, keep in zip(ids, m, strict=True) if keep]
                                         for ids, m in zip(response.tolist(),
                                                           response_mask.tolist(), strict=True)]
        t0 = time.perf_counter()
        # Prefixes first: a reward's parts() then describe the whole responses.
        potentials = (self.prefix_scores(prompts, response, response_mask, stops, columns)
                      if self.prefix_shaping else None)
        scores = self.score(prompts, texts, columns)
        reward_seconds = time.perf_counter() - t0
        scores = self.penalise(scores, ended, response_mask)
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
            logprobs=out.logprobs, hidden=out.hidden)

    def sample_turns(self, policy: Policy, idx: list[int], query: Tensor, query_mask: Tensor,
                     stops: list[int], temperature: float,
                     generator: torch.Generator | None, record: bool,
                     share: tuple[int, int] | None = None) -> Episodes:
        """``sample`` with an interaction: the episodes turn by turn (``run_turns``), scored
        on their whole transcript, each ``Reply`` reward on its turn's last model token."""
        assert self.turns is not None
        prompts, prompt_ids = [self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx]
        states = self.turns.start(prompts, share)
        settings = SamplingSettings(self.max_new_tokens, stops, self.tokenizer.pad_token_id,
                                    temperature, self.top_k, self.top_p, self.ignore_eos)
        tr = run_turns(policy, self.turns.interaction, prompts, prompt_ids, query, query_mask,
                       states, self.tokenizer, self.turns.encode, settings, self.turns.max_turns,
                       self.turns.caps(prompt_ids, policy), generator, record)
        texts = self.decode(tr.tokens, tr.attention_mask, stops)
        t0 = time.perf_counter()
        scores = self.score(prompts, texts, {**self.columns_at(idx),
                                             **self.turns.turn_columns(tr, states)})
        reward_seconds = time.perf_counter() - t0
        scores = self.penalise(scores, tr.ended, tr.model_mask)
        token_scores = None
        if tr.has_turn_rewards:
            token_scores = turn_token_scores(scores, tr.turn_rewards, tr.model_mask.cpu())
            scores = token_scores.sum(1)
        device = query.device
        return Episodes(
            prompts=prompts, responses=texts, input_ids=torch.cat([query, tr.tokens], 1),
            attention_mask=torch.cat([query_mask, tr.attention_mask], 1),
            response_mask=tr.model_mask, scores=scores.float().to(device), ended=tr.ended,
            reward_parts=self.reward_parts(), reward_seconds=reward_seconds,
            token_scores=token_scores.float().to(device) if token_scores is not None else None,
            logprobs=tr.logprobs, hidden=tr.hidden, turn_info=self.turns.info(tr, states))

    def columns_at(self, idx: list[int]) -> dict[str, list[Any]]:
        """The columns the reward takes, at prompt indices ``idx`` (one value per episode),
        and the prompts' messages when it names ``prompt_messages``."""
        out = {k: [self.columns[k][i] for i in idx] for k in self.reward_columns}
        if "prompt_messages" in self.reward_fields:
            out["prompt_messages"] = [self.prompt_messages[i] for i in idx]
        return out

    def prefix_scores(self, prompts: list[str], response: Tensor, response_mask: Tensor,
                      stop_ids: Iterable[int] | None = None,
                      columns: dict[str, list[Any]] | None = None) -> Tensor:
        """The reward of every proper prefix of each response: ``phi[b, t]`` is the score of the
        text of its first ``t`` tokens (EOS dropped: the ids ``stop_ids``, by default those of
        ``stop_ids()``), for ``1 <= t < n_b`` (``n_b`` its tokens); 0 elsewhere. All prefixes
        go to the reward function in one call (with ``completion_ids``, each prefix's ids).

        Shapes: response, response_mask (B, T) -> phi (B, T) float64."""
        eos = set(self.stop_ids() if stop_ids is None else stop_ids)
        where: list[tuple[int, int]] = []
        items: list[tuple[str, str]] = []
        prefix_ids: list[list[int]] = []
        for b, (ids, m) in enumerate(zip(response.tolist(), response_mask.tolist(),
                                         strict=True)):
            n = int(sum(m))
            for t in range(1, n):
                where.append((b, t))
                prefix_ids.append(ids[:t])
                items.append((prompts[b], self.tokenizer.decode(
                    [i for i in ids[:t] if i not in eos], skip_special_tokens=True)))
        phi = torch.zeros(response.shape, dtype=torch.float64)
        if items:
            rows_of = [b for b, _ in where]
            per_item = {k: [v[b] for b in rows_of] for k, v in (columns or {}).items()}
            if "completion_ids" in per_item:
                per_item["completion_ids"] = prefix_ids
            values = self.score([p for p, _ in items], [r for _, r in items], per_item)
            rows, cols = zip(*where, strict=True)
            phi[list(rows), list(cols)] = values
        return phi

    def decode(self, response: torch.Tensor, response_mask: torch.Tensor,
               stop_ids: Iterable[int] | None = None) -> list[str]:
        """Response texts, cut before EOS, special tokens dropped. ``stop_ids``: the ids that end
        a response, all left out of the text (by default those of ``stop_ids()``: the
        tokenizer's EOS and ``stop_token_ids``; ``sample`` passes the policy's as well)."""
        eos = set(self.stop_ids() if stop_ids is None else stop_ids)
        out = []
        for ids, m in zip(response.tolist(), response_mask.tolist(), strict=True):
            ids = [t for t, keep in zip(ids, m, strict=True) if keep and t not in eos]
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    def score(self, prompts: list[str], responses: list[str],
              columns: dict[str, list[Any]] | None = None) -> torch.Tensor:
        """Call the reward function (with ``columns``, aligned with the responses) and validate
        what it returns. Shapes: -> (B,) float64."""
        columns = columns or {}
        try:
            values = self.reward_fn(prompts, responses, **columns)
        except Exception as e:
            raise self._locate_failure(prompts, responses, columns, e) from e
        return check_scores(values, prompts)

    def _locate_failure(self, prompts: list[str], responses: list[str],
                        columns: dict[str, list[Any]], err: Exception) -> RewardError:
        """Find the first item the reward function fails on, to name it in the error."""
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                self.reward_fn([p], [r], **{k: [v[i]] for k, v in columns.items()})
            except Exception as e:  # the item that fails on its own
                return RewardError(f"reward function raised {type(e).__name__}: {e} at batch "
                                   f"index {i} (prompt {p!r}, response {r!r}).")
        return RewardError(f"reward function raised {type(err).__name__}: {err} on a batch of "
                           f"{len(prompts)} (first prompt {prompts[0]!r}).")

    def penalise(self, scores: Tensor, ended: Tensor, mask: Tensor) -> Tensor:
        """The scores with the length terms: ``missing_eos_penalty`` subtracted where no end
        token came (as TRL does), DAPO's overlong term added. Shapes: (B,), (B,), (B, T)
        -> (B,) on the scores' device."""
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~ended).to(scores.dtype).cpu()
        if self.overlong is not None:
            buffer, factor = self.overlong
            term = overlong_penalty(mask.sum(1).cpu(), self.max_model_tokens, buffer, factor)
            self.overlong_mean = float(term.mean())
            scores = scores + term.to(scores.dtype)
        return scores

    def reward_parts(self) -> dict[str, float]:
        parts = getattr(self.reward_fn, "parts", None)
        out = dict(parts()) if callable(parts) else {}
        if self.overlong_mean is not None:
            out["overlong"] = self.overlong_mean
        return out


def generation_eos_ids(policy: Any) -> list[int]:
    """The end-of-sequence ids of ``policy.model.generation_config`` (a Hugging Face model's;
    ``eos_token_id`` an int or a list of ints), or [] when it has none."""
    config = getattr(getattr(policy, "model", None), "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, (list, tuple)) else []
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return []
    return [int(t) for t in ids if t >= 0]

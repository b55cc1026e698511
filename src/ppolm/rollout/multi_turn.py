"""Multi-turn episodes: the batch advances turn by turn, an ``Interaction`` answering each model
turn, and the episode is kept as token ids from start to end.

The token contract (docs/multi-turn.md): a model turn's sampled ids are appended as they are
(never decoded and encoded again: that changes ids at merges, spaces and special tokens, as
trl#5224 and verl#6501 found); only the environment's reply is tokenized. With a chat template
the reply is rendered as a message and only its own tokens are appended, with the separator
the template puts after the model's end-of-turn token. The transcript after the prompt is the
batch's "response" region: ``model_mask`` marks the model's tokens (what PPO trains), the
replies are context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ppolm.errors import ConfigError, DataError, RewardError
from ppolm.policies.base import Policy
from ppolm.rollout.interaction import (
    Interaction,
    call_reply,
    call_reset,
    check_interaction,
    episode_rng,
)
from ppolm.rollout.rewards import reward_columns
from ppolm.rollout.sampling import Past, generate
from ppolm.rollout.types import TurnInfo

# The assistant content of the conversation a reply is rendered after: any text works, one the
# template cannot contain by itself makes the cut unambiguous.
_MARK = "\u2063ppolm-turn\u2063"


@dataclass(frozen=True)
class SamplingSettings:
    """How each model turn is sampled (the env's settings, the Trainer's temperature)."""

    max_new_tokens: int
    stop_ids: list[int]            # the ids that end a turn (also when ignored for stopping)
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ignore_eos: bool = False


@dataclass
class Transcripts:
    """The episodes after their prompts, as token ids. B episodes, T the longest transcript.

    ``turn_rewards`` holds each ``Reply(reward=...)`` at the last model token of its turn."""

    tokens: Tensor                  # (B, T) long, pad after the episode's end
    attention_mask: Tensor          # (B, T) long: 1 on every token of the transcript
    model_mask: Tensor              # (B, T) long: 1 on the model's tokens only
    turn_rewards: Tensor            # (B, T) float64
    ended: Tensor                   # (B,) bool: the last model turn ended at a stop token
    turns: list[list[str]]          # the model's turns as text, per episode
    truncated: list[bool]           # stopped by max_turns or max_episode_tokens
    has_turn_rewards: bool = False
    logprobs: Tensor | None = None  # (B, T) the sampler's, 0 on reply tokens (record=True)
    hidden: Tensor | None = None    # (B, T, H) the sampler's states, 0 on reply tokens
    replies: list[list[str]] = field(default_factory=list)
    reply_roles: list[list[str]] = field(default_factory=list)    # each reply's chat role


class ReplyEncoder:
    """The token ids a reply appends to an episode.

    Plain tokenizers: the reply's text, encoded without special tokens. Chat templates
    (``chat=True``): the reply rendered as a message of its role after an assistant turn, cut
    where that turn's rendering ends, so the ids are the template's separator after the
    assistant's end-of-turn token, the message, and the next assistant header; when the turn
    did not end at an end token (``max_new_tokens`` reached) the template's closing of the
    assistant message comes first."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self._cache: dict[tuple[str, str, int | None], list[int]] = {}

    def __call__(self, text: str, role: str, last_token: int | None) -> list[int]:
        if not self.chat:
            ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return ids
        key = (text, role, last_token)
        if key not in self._cache:
            self._cache[key] = self.tokenizer(self.chat_text(text, role, last_token),
                                              add_special_tokens=False)["input_ids"]
        return list(self._cache[key])

    def chat_text(self, text: str, role: str, last_token: int | None) -> str:
        """The text the template adds for the message after an assistant turn that ended with
        ``last_token`` (None: at no end token)."""
        head = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
        before: str = self.tokenizer.apply_chat_template(head, tokenize=False)
        after: str = self.tokenizer.apply_chat_template(
            [*head, {"role": role, "content": text}], tokenize=False,
            add_generation_prompt=True)
        if _MARK not in before or not after.startswith(before):
            raise DataError("the tokenizer's chat template renders the conversation before a "
                            f"{role!r} message differently once the message is added, so the "
                            "message's own tokens cannot be appended to the episode; use a "
                            "template that renders earlier messages unchanged.")
        closing = before[before.rindex(_MARK) + len(_MARK):]    # e.g. "<|im_end|>\n"
        if last_token is not None:
            end = self.tokenizer.decode([last_token])
            if end and closing.startswith(end):     # the model sampled the end token itself
                closing = closing[len(end):]
        return closing + after[len(before):]


def left_pad(rows: Sequence[list[int]], pad_token_id: int, device: torch.device
             ) -> tuple[Tensor, Tensor]:
    """Rows of ids, left-padded. Shapes: -> ids (B, L) long, attention mask (B, L) long."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, L - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, L - len(r):] = 1
    return ids.to(device), mask.to(device)


def run_turns(policy: Policy, interaction: Interaction, prompts: list[str],
              prompt_ids: list[list[int]], query: Tensor, query_mask: Tensor,
              states: list[dict[str, Any]], tokenizer: Any, encode: ReplyEncoder,
              settings: SamplingSettings, max_turns: int, caps: list[int],
              generator: torch.Generator | None = None, record: bool = False) -> Transcripts:
    """Sample the episodes turn by turn. Each turn, the unfinished episodes (their prompt and
    transcript, left-padded) are sampled together, up to ``max_new_tokens`` each; then each
    gets the interaction's reply. An episode ends when the reply is None, after ``max_turns``
    model turns, or when its reply and one more whole turn would pass its cap (``caps``:
    tokens after the prompt; then it is flagged truncated and the reply not appended).
    The first turn samples ``query`` as it is, so with no reply the episodes are exactly those
    of one-turn sampling. Each later turn goes on from the cache of the turns before (the
    episodes that go on cut out of it with ``policy.select_cache``) and feeds only the reply,
    so a turn costs about its own tokens; a policy that cannot cut its cache runs the whole
    conversation again instead.

    Shapes: query, query_mask (B, P) left-padded, the prompts' ids -> ``Transcripts``."""
    B, device = len(prompts), query.device
    stops = set(settings.stop_ids)
    ids: list[list[int]] = [[] for _ in range(B)]
    model: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[Tensor]] = [[] for _ in range(B)]
    hid: list[list[Tensor]] = [[] for _ in range(B)]
    rewards: list[list[tuple[int, float]]] = [[] for _ in range(B)]
    turns: list[list[str]] = [[] for _ in range(B)]
    replies: list[list[str]] = [[] for _ in range(B)]
    roles: list[list[str]] = [[] for _ in range(B)]
    truncated, ended = [False] * B, [False] * B
    active = list(range(B))
    feed: list[list[int]] = [[] for _ in range(B)]   # what the next turn feeds to the cache
    past: Past | None = None
    for turn in range(max_turns):
        if turn == 0:
            q, qm = query, query_mask
        elif past is not None:
            q, qm = left_pad([feed[i] for i in active], settings.pad_token_id, device)
        else:
            q, qm = left_pad([prompt_ids[i] + ids[i] for i in active], settings.pad_token_id,
                             device)
        out = generate(policy, q, qm, settings.max_new_tokens,
                       None if settings.ignore_eos else settings.stop_ids,
                       settings.pad_token_id, settings.temperature, settings.top_k,
                       settings.top_p, generator, record=record, past=past,
                       keep=turn < max_turns - 1)
        lengths, steps = out.mask.sum(1).tolist(), out.tokens.shape[1]
        going = []
        for j, i in enumerate(active):
            n = int(lengths[j])
            new = out.tokens[j, :n].tolist()
            # the pass's last drawn token is not in the cache yet
            feed[i] = new[-1:] if n == steps else []
            ids[i] += new
            model[i] += [1] * n
            if out.logprobs is not None and out.hidden is not None:
                lps[i].append(out.logprobs[j, :n])
                hid[i].append(out.hidden[j, :n])
            ended[i] = any(t in stops for t in new)
            turns[i].append(tokenizer.decode([t for t in new if t not in stops],
                                             skip_special_tokens=True))
            reply = call_reply(interaction, prompts[i], list(turns[i]), states[i])
            if reply is None:
                continue
            if reply.reward is not None:
                rewards[i].append((len(ids[i]) - 1, float(reply.reward)))
            replies[i].append(reply.text)
            roles[i].append(reply.role or interaction.reply_role)
            extra = encode(reply.text, roles[i][-1],
                           new[-1] if new and new[-1] in stops else None)
            if turn == max_turns - 1 or len(ids[i]) + len(extra) + settings.max_new_tokens \
                    > caps[i]:
                truncated[i] = True
                continue
            ids[i] += extra
            feed[i] += extra
            model[i] += [0] * len(extra)
            if out.logprobs is not None and out.hidden is not None:
                lps[i].append(out.logprobs.new_zeros(len(extra)))
                hid[i].append(out.hidden.new_zeros(len(extra), out.hidden.shape[-1]))
            going.append(i)
        kept = set(going)
        past = _going_on(policy, out.past, [j for j, i in enumerate(active) if i in kept])
        active = going
        if not active:
            break
    tr = _assemble(ids, model, lps, hid, rewards, turns, replies, truncated, ended,
                   settings.pad_token_id, device)
    tr.reply_roles = roles
    return tr


def _going_on(policy: Policy, past: Past | None, rows: list[int]) -> Past | None:
    """``past`` cut to the batch rows ``rows``; None when the policy cannot cut its cache."""
    if past is None or not rows or len(rows) == past.mask.shape[0]:
        return past
    index = torch.tensor(rows, dtype=torch.long, device=past.mask.device)
    cache = policy.select_cache(past.cache, index)
    return None if cache is None else Past(cache, past.mask[index], past.last[index])


def _assemble(ids: list[list[int]], model: list[list[int]], lps: list[list[Tensor]],
              hid: list[list[Tensor]], rewards: list[list[tuple[int, float]]],
              turns: list[list[str]], replies: list[list[str]], truncated: list[bool],
              ended: list[bool], pad_token_id: int, device: torch.device) -> Transcripts:
    """The per-episode lists as right-padded (B, T) tensors."""
    B, T = len(ids), max(len(r) for r in ids)
    tokens = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    model_mask = torch.zeros((B, T), dtype=torch.long)
    turn_rewards = torch.zeros((B, T), dtype=torch.float64)
    for b in range(B):
        n = len(ids[b])
        tokens[b, :n] = torch.tensor(ids[b], dtype=torch.long)
        attention[b, :n] = 1
        model_mask[b, :n] = torch.tensor(model[b], dtype=torch.long)
        for pos, r in rewards[b]:
            turn_rewards[b, pos] += r
    logprobs = hidden = None
    if all(lps):
        logprobs = torch.zeros((B, T), dtype=lps[0][0].dtype, device=device)
        H = hid[0][0].shape[-1]
        hidden = torch.zeros((B, T, H), dtype=hid[0][0].dtype, device=device)
        for b in range(B):
            n = len(ids[b])
            logprobs[b, :n] = torch.cat(lps[b])
            hidden[b, :n] = torch.cat(hid[b])
    return Transcripts(tokens=tokens.to(device), attention_mask=attention.to(device),
                       model_mask=model_mask.to(device), turn_rewards=turn_rewards,
                       ended=torch.tensor(ended, device=device), turns=turns,
                       truncated=truncated, has_turn_rewards=any(rewards),
                       logprobs=logprobs, hidden=hidden, replies=replies)


#: What a reward function may name, besides the prompts' columns, to receive per episode.
TURN_COLUMNS = ("turns", "states")


class MultiTurn:
    """A TextGenerationEnv's multi-turn settings and its episodes counter (the place of each
    episode in the run, which seeds its ``random.Random``; part of the env's state).

    Args:
        interaction: the ``Interaction`` answering each model turn.
        tokenizer: the env's tokenizer (with a chat template, replies are rendered as
            messages: see ``ReplyEncoder``).
        max_new_tokens: the longest model turn.
        max_turns: the most model turns of an episode (>= 1).
        max_episode_tokens: the most tokens after the prompt (model turns and replies); a
            reply after which a whole turn would not fit ends the episode, flagged truncated.
            None: ``max_turns * (max_new_tokens + 256)``. The policy's context caps it too.
        seed: the run's seed.
    """

    def __init__(self, interaction: Any, tokenizer: Any, max_new_tokens: int, max_turns: int,
                 max_episode_tokens: int | None, seed: int) -> None:
        self.interaction = check_interaction(interaction)
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ConfigError(f"max_turns={max_turns!r} must be an int >= 1 (the most model "
                              "turns of an episode).")
        if max_episode_tokens is None:
            max_episode_tokens = max_turns * (max_new_tokens + 256)
        if (isinstance(max_episode_tokens, bool) or not isinstance(max_episode_tokens, int)
                or max_episode_tokens < max_new_tokens):
            raise ConfigError(f"max_episode_tokens={max_episode_tokens!r} must be an int >= "
                              f"max_new_tokens={max_new_tokens} (one whole model turn).")
        self.max_turns, self.max_episode_tokens, self.seed = max_turns, max_episode_tokens, seed
        self.max_new_tokens = max_new_tokens
        self.encode = ReplyEncoder(tokenizer, chat=bool(getattr(tokenizer, "chat_template",
                                                               None)))
        self.episodes = 0               # episodes sampled so far in the run
        self.extra_columns: list[str] = []

    @property
    def max_model_tokens(self) -> int:
        """The most model tokens an episode can hold."""
        return min(self.max_turns * self.max_new_tokens, self.max_episode_tokens)

    def reward_columns(self, fn: Any, names: list[str]) -> list[str]:
        """The prompts' columns ``fn`` takes (as ``ppolm.rollout.rewards.reward_columns``);
        keeps which of ``TURN_COLUMNS`` it takes (all of them with ``**kwargs``)."""
        clash = [n for n in TURN_COLUMNS if n in names]
        if clash:
            raise DataError(f"the prompts have columns {clash}, which a multi-turn env gives "
                            "the reward itself (the model's turns, the episodes' states); "
                            "rename them.")
        taken = reward_columns(fn, [*names, *TURN_COLUMNS], strict=False)
        self.extra_columns = [n for n in taken if n in TURN_COLUMNS]
        dataset = [n for n in taken if n not in TURN_COLUMNS]
        if names and not dataset:
            raise RewardError(f"reward function {fn!r} does not accept the prompts' other "
                              f"columns {names}: add **columns to its signature.")
        return dataset

    def caps(self, prompt_ids: list[list[int]], policy: Policy) -> list[int]:
        """Each episode's token cap after its prompt: max_episode_tokens and the policy's
        context."""
        if policy.max_length is None:
            return [self.max_episode_tokens] * len(prompt_ids)
        return [min(self.max_episode_tokens, policy.max_length - len(p)) for p in prompt_ids]

    def start(self, prompts: list[str], share: tuple[int, int] | None = None
              ) -> list[dict[str, Any]]:
        """The states of the batch's episodes ``prompts``, each ``reset`` with its own
        generator. ``share``: (the first of them in the batch, the batch's episodes) when they
        are one rank's share of it, so that the ranks draw what one process drawing the whole
        batch would; None: they are the whole batch."""
        offset, total = share if share is not None else (0, len(prompts))
        if not 0 <= offset <= total - len(prompts):
            raise DataError(f"share={share} does not hold {len(prompts)} episodes.")
        first, self.episodes = self.episodes + offset, self.episodes + total
        return [call_reset(self.interaction, p, episode_rng(self.seed, first + b))
                for b, p in enumerate(prompts)]

    def turn_columns(self, tr: Transcripts, states: list[dict[str, Any]]
                     ) -> dict[str, list[Any]]:
        """What the reward takes of ``TURN_COLUMNS``."""
        given: dict[str, list[Any]] = {"turns": tr.turns, "states": states}
        return {k: given[k] for k in self.extra_columns}

    def info(self, tr: Transcripts, states: list[dict[str, Any]]) -> TurnInfo:
        """The episodes' facts for logging."""
        device = tr.ended.device        # the batch's (the metrics sum them over ranks)
        return TurnInfo(turns=tr.turns, replies=tr.replies, reply_roles=tr.reply_roles,
                        states=states,
                        num_turns=torch.tensor([len(t) for t in tr.turns], device=device),
                        truncated=torch.tensor(tr.truncated, device=device),
                        tool_errors=torch.tensor([self.interaction.tool_errors(s)
                                                  for s in states], device=device))

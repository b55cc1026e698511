"""Episodes cut and joined: some of a batch's episodes, or the episodes of several sampling
rounds as one batch (dynamic sampling keeps the groups with signal from each round).

Joining pads as ``World.gather_rollout`` does: prompts on the left and responses on the right
to the widest part's, padding 0 and masked out, so every model sees the same real tokens at the
same positions relative to its prompt.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ppolm.errors import DataError
from ppolm.rollout.types import Episodes, TurnInfo

_PER_EPISODE_LISTS = ("prompts", "responses")


def select_episodes(episodes: Episodes, idx: list[int]) -> Episodes:
    """The episodes at ``idx`` (in that order), as a smaller batch; ``reward_parts`` and
    ``reward_seconds`` are the batch's."""
    rows = torch.tensor(idx, dtype=torch.long, device=episodes.input_ids.device)
    out: dict[str, Any] = {}
    for f in fields(episodes):
        x = getattr(episodes, f.name)
        if f.name in _PER_EPISODE_LISTS:
            out[f.name] = [x[i] for i in idx]
        elif isinstance(x, Tensor):
            out[f.name] = x[rows.to(x.device)]
    if episodes.turn_info is not None:
        out["turn_info"] = _select_turns(episodes.turn_info, idx)
    return replace(episodes, **out)


def _select_turns(info: TurnInfo, idx: list[int]) -> TurnInfo:
    out: dict[str, Any] = {}
    for f in fields(info):
        x = getattr(info, f.name)
        if isinstance(x, Tensor):
            out[f.name] = x[torch.tensor(idx, dtype=torch.long, device=x.device)]
        elif x:                       # a list per episode (reply_roles may be empty)
            out[f.name] = [x[i] for i in idx]
    return replace(info, **out)


def concat_episodes(parts: list[Episodes]) -> Episodes:
    """The episodes of ``parts``, one after another, as one batch: prompts left-padded and
    responses right-padded to the widest part's (padding 0, masked out). ``reward_parts`` are
    the means over all the parts' episodes, ``reward_seconds`` the sum.
    Shapes: parts of (B_i, P_i + T_i) -> (sum B_i, max P + max T)."""
    if not parts:
        raise DataError("concat_episodes needs at least one batch of episodes.")
    if len(parts) == 1:
        return parts[0]
    P = max(e.prompt_len for e in parts)
    T = max(e.response_mask.shape[1] for e in parts)
    out: dict[str, Any] = {}
    for f in fields(Episodes):
        values = [getattr(e, f.name) for e in parts]
        if f.name in _PER_EPISODE_LISTS:
            out[f.name] = [x for v in values for x in v]
        elif f.name in ("input_ids", "attention_mask"):
            out[f.name] = torch.cat([F.pad(x, (P - e.prompt_len, T - e.response_mask.shape[1]))
                                     for x, e in zip(values, parts, strict=True)])
        elif all(isinstance(x, Tensor) for x in values):
            out[f.name] = torch.cat([_pad_response(x, T) for x in values])
        elif any(x is not None for x in values) and f.name not in (
                "reward_parts", "reward_seconds", "turn_info"):
            raise DataError(f"the batches to join disagree on {f.name!r}: some have it, some "
                            "not.")
    sizes = [len(e.prompts) for e in parts]
    names = {k for e in parts for k in e.reward_parts}
    out["reward_parts"] = {k: sum(e.reward_parts.get(k, 0.0) * n
                                  for e, n in zip(parts, sizes, strict=True)) / sum(sizes)
                           for k in sorted(names)}
    out["reward_seconds"] = sum(e.reward_seconds for e in parts)
    infos = [e.turn_info for e in parts]
    if all(i is not None for i in infos):
        out["turn_info"] = _concat_turns([i for i in infos if i is not None])
    return Episodes(**out)


def _pad_response(x: Tensor, T: int) -> Tensor:
    """(B, T_i, ...) -> (B, T, ...); a (B,) tensor as it is."""
    if x.dim() < 2:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, T - x.shape[1]))


def _concat_turns(infos: list[TurnInfo]) -> TurnInfo:
    out: dict[str, Any] = {}
    for f in fields(TurnInfo):
        values = [getattr(i, f.name) for i in infos]
        out[f.name] = (torch.cat(values) if isinstance(values[0], Tensor)
                       else [x for v in values for x in v])
    return TurnInfo(**out)

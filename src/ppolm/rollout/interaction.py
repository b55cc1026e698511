"""What happens between the model's turns: an ``Interaction`` answers each model turn with a
message (appended to the episode as context, never trained on) or ends the episode.

    class Lookup(Interaction):
        def reset(self, prompt, rng):                 # optional: the episode's state
            return {"secret": rng.randrange(10)}
        def reply(self, prompt, turns, state):        # after each model turn
            return f"={state['secret']}" if len(turns) == 1 and "?" in turns[-1] else None

``reply`` returns a string, a ``Reply`` (a string with a reward for the turn just made) or None
(the episode ends). ``ppolm.rollout.multi_turn`` runs the turns; docs/multi-turn.md explains
the token contract and the credit assignment.
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass
from typing import Any

from ppolm.errors import ConfigError, DataError, TrainingError

#: Roles a reply may be rendered with in a chat template.
REPLY_ROLES = ("user", "tool", "system")


@dataclass(frozen=True)
class Reply:
    """The environment's message after a model turn, and optionally a reward for that turn
    (placed on the turn's last model token). ``role``: the chat role it is rendered with
    (default the interaction's ``reply_role``)."""

    text: str
    reward: float | None = None
    role: str | None = None


class Interaction:
    """Subclass and implement ``reply``; ``reset`` is optional. A subclass may set
    ``reply_role``, the chat role its replies are rendered with ("user"; a ToolInteraction's
    are "tool")."""

    reply_role: str = "user"

    def reset(self, prompt: str, rng: random.Random) -> dict[str, Any]:
        """The state of a new episode (a dict, passed to every ``reply`` of the episode and
        to a reward that names ``states``). ``rng`` is the episode's own generator, seeded from
        the run's seed and the episode's place in the run: draw from it, not from ``random``,
        so that runs repeat and a resume continues exactly."""
        return {}

    def reply(self, prompt: str, turns: list[str], state: dict[str, Any]
              ) -> str | Reply | None:
        """The message after the model's newest turn (``turns[-1]``; ``turns`` holds the
        model's turns so far as text), or None to end the episode."""
        raise NotImplementedError(f"{type(self).__name__} must implement reply(prompt, turns, "
                                  "state).")

    def tool_schemas(self) -> list[dict[str, Any]]:
        """JSON schemas of the tools the model may call, passed to the chat template
        (``apply_chat_template(tools=...)``); none by default."""
        return []

    def tool_errors(self, state: dict[str, Any]) -> int:
        """How many of the episode's tool calls failed (for logging); 0 by default."""
        return 0


def episode_rng(seed: int, episode: int) -> random.Random:
    """The generator of the run's ``episode``-th episode (counted from 0): a function of the
    seed and the place only (a string seed goes through SHA-512, so every process and every
    Python version draws the same numbers)."""
    return random.Random(f"ppolm-episode:{seed}:{episode}")


def check_interaction(interaction: Any) -> Interaction:
    """``interaction`` if it is an ``Interaction``, else a ConfigError saying what to give."""
    if not isinstance(interaction, Interaction):
        raise ConfigError(f"interaction={interaction!r} must be a ppolm.Interaction (a subclass "
                          "implementing reply(prompt, turns, state)); for tools, give "
                          "ToolInteraction(tools=[...]).")
    role = interaction.reply_role
    if role not in REPLY_ROLES:
        raise ConfigError(f"{type(interaction).__name__}.reply_role={role!r}: use one of "
                          f"{list(REPLY_ROLES)}.")
    return interaction


def call_reset(interaction: Interaction, prompt: str, rng: random.Random) -> dict[str, Any]:
    """``interaction.reset``, its failures as TrainingError and a non-dict as DataError."""
    try:
        state = interaction.reset(prompt, rng)
    except Exception as e:
        raise TrainingError(f"{type(interaction).__name__}.reset raised {type(e).__name__}: {e} "
                            f"on prompt {prompt[-80:]!r}.") from e
    if not isinstance(state, dict):
        raise DataError(f"{type(interaction).__name__}.reset returned {state!r} "
                        f"({type(state).__name__}); it must return a dict (the episode's "
                        "state).")
    return state


def call_reply(interaction: Interaction, prompt: str, turns: list[str],
               state: dict[str, Any]) -> Reply | None:
    """``interaction.reply`` as a ``Reply`` (or None): its failures as a TrainingError naming
    the interaction, the prompt and the turn; anything but str / Reply / None as DataError."""
    who = type(interaction).__name__
    try:
        out = interaction.reply(prompt, turns, state)
    except Exception as e:
        raise TrainingError(f"{who}.reply raised {type(e).__name__}: {e} after model turn "
                            f"{len(turns)} ({turns[-1][:80]!r}) of prompt {prompt[-80:]!r}. "
                            "No update was applied.") from e
    if out is None:
        return None
    if isinstance(out, str):
        return Reply(out)
    if not isinstance(out, Reply) or not isinstance(out.text, str):
        raise DataError(f"{who}.reply returned {out!r} ({type(out).__name__}) after turn "
                        f"{len(turns)} of prompt {prompt[-80:]!r}; return a str, a "
                        "ppolm.Reply(text, reward=...) or None (end the episode).")
    r = out.reward
    if r is not None and (isinstance(r, bool) or not isinstance(r, numbers.Real)
                          or not math.isfinite(float(r))):
        raise DataError(f"{who}.reply returned Reply(reward={r!r}) after turn {len(turns)} "
                        f"of prompt {prompt[-80:]!r}; a turn's reward must be a finite number "
                        "or None.")
    if out.role is not None and out.role not in REPLY_ROLES:
        raise DataError(f"{who}.reply returned Reply(role={out.role!r}); use one of "
                        f"{list(REPLY_ROLES)} or None.")
    return out

"""Tools the model may call during an episode: ``ToolInteraction(tools=[...])``.

Each tool is a Python function with type hints and a Google-style docstring (a description and
an ``Args:`` line per argument); its JSON schema (``transformers.utils.get_json_schema``, as TRL
builds them) goes to the chat template (``apply_chat_template(tools=...)``). A model turn that
holds tool calls, in the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` format of
the Hermes, Qwen and SmolLM2 templates (another format: ``parser``), gets one reply (role
``tool``) with each call's result; a turn with no call ends the episode (the model answered).

Tools run in the trainer's process, with its rights (files, network, credentials): give the
model only tools you would let any text call. Each call runs in a daemon thread with a timeout,
so a tool that hangs costs ``timeout`` seconds and a message to the model, not the run; a
tool's exception becomes its message. A thread cannot be killed: a hung tool keeps its thread
(and whatever it holds) until it returns.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ppolm.errors import ConfigError
from ppolm.rollout.interaction import Interaction, Reply

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any]


class MalformedCall(ValueError):
    """What a parser raises for text that tries to call a tool and fails (bad JSON, no name)."""


def parse_hermes(text: str) -> list[ToolCall]:
    """The calls in ``text``: each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    (arguments may also be a JSON string of the object, as some models write them). Raises
    MalformedCall when a call is not valid; [] when there is none."""
    bodies = _CALL.findall(text)
    if not bodies and "<tool_call>" in text:
        raise MalformedCall("<tool_call> without </tool_call>")
    calls = []
    for body in bodies:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise MalformedCall(f"not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise MalformedCall('expected {"name": ..., "arguments": {...}}')
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise MalformedCall("arguments are not a JSON object") from None
        if not isinstance(args, dict):
            raise MalformedCall("arguments are not a JSON object")
        calls.append(ToolCall(obj["name"], args))
    return calls


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a tool from its type hints and docstring, or a ConfigError saying
    what the function lacks."""
    from transformers.utils import get_json_schema

    try:
        schema: dict[str, Any] = get_json_schema(fn)
    except Exception as e:  # transformers raises its own parsing exceptions
        raise ConfigError(f"tool {getattr(fn, '__name__', fn)!r}: cannot build its JSON schema "
                          f"({e}). Give it type hints and a docstring with a description and "
                          "an 'Args:' line for each argument.") from None
    return schema


def tools_system_prompt(schemas: Sequence[dict[str, Any]]) -> str:
    """The tools and the call format in words, Qwen2.5's and Hermes' way: for a chat template
    that does not render ``tools`` itself (SmolLM2's), put in the system message."""
    lines = "\n".join(json.dumps(s) for s in schemas)
    return ("You may call one or more functions to assist with the user query.\n\nYou are "
            "provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function "
            "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def run_with_timeout(fn: Callable[..., Any], arguments: dict[str, Any], timeout: float
                     ) -> tuple[bool, Any]:
    """``fn(**arguments)`` in a daemon thread: (True, its result) or (False, the error's
    message: its exception, wrong arguments, or the timeout)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn(**arguments)
        except BaseException as e:      # everything the tool raises goes back as a message
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="ppolm-tool")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, f"timed out after {timeout:g} s"
    if "error" in out:
        e = out["error"]
        return False, f"{type(e).__name__}: {e}"
    return True, out.get("result")


class ToolInteraction(Interaction):
    """The model's turns may call ``tools``; each turn with calls gets their results as one
    ``tool`` message, a turn without calls ends the episode.

    Args:
        tools: functions with type hints and docstrings (see ``tool_schema``); their names
            are the names the model calls.
        parser: text -> list of ``ToolCall``, raising ``MalformedCall`` (default
            ``parse_hermes``, the ``<tool_call>`` JSON format).
        timeout: seconds a call may run (default 5).
        max_calls: the most calls of an episode; later ones are answered with an error.

    The reply to each call is its result (a string as it is, anything else as JSON), or
    ``error: `` and what went wrong: "unknown tool", "malformed call", wrong arguments, the
    exception's message, or the timeout. Failed calls are counted in the episode's state
    (``tool_errors``, logged as ``tool_errors_mean``).
    """

    reply_role = "tool"

    def __init__(self, tools: Sequence[Callable[..., Any]],
                 parser: Callable[[str], list[ToolCall]] | None = None, timeout: float = 5.0,
                 max_calls: int = 8) -> None:
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence) or not tools:
            raise ConfigError(f"tools={tools!r} must be a non-empty list of functions.")
        bad = [t for t in tools if not callable(t)]
        if bad:
            raise ConfigError(f"tools {bad!r} are not callables; give functions.")
        self.schemas = [tool_schema(t) for t in tools]
        names = [s["function"]["name"] for s in self.schemas]
        if len(set(names)) != len(names):
            raise ConfigError(f"two tools share a name: {names}.")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(f"timeout={timeout!r} must be a number of seconds > 0.")
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
            raise ConfigError(f"max_calls={max_calls!r} must be an int >= 1.")
        if parser is not None and not callable(parser):
            raise ConfigError(f"parser={parser!r} must be a function text -> list[ToolCall].")
        self.tools = dict(zip(names, tools, strict=True))
        self.parser = parser or parse_hermes
        self.timeout, self.max_calls = float(timeout), max_calls

    def tool_schemas(self) -> list[dict[str, Any]]:
        return list(self.schemas)

    def reset(self, prompt: str, rng: Any) -> dict[str, Any]:
        return {"tool_calls": 0, "tool_errors": 0}

    def tool_errors(self, state: dict[str, Any]) -> int:
        return int(state.get("tool_errors", 0))

    def reply(self, prompt: str, turns: list[str], state: dict[str, Any]) -> Reply | None:
        try:
            calls = self.parser(turns[-1])
        except MalformedCall as e:
            state["tool_errors"] = state.get("tool_errors", 0) + 1
            return Reply(f"error: malformed call: {e}")
        if not calls:
            return None
        return Reply("\n".join(self.call(c, state) for c in calls))

    def call(self, call: ToolCall, state: dict[str, Any]) -> str:
        """One call's reply text; failures counted in ``state["tool_errors"]``."""
        state["tool_calls"] = state.get("tool_calls", 0) + 1
        ok, value = False, ""
        if state["tool_calls"] > self.max_calls:
            value = f"too many tool calls (at most {self.max_calls} per episode)"
        elif call.name not in self.tools:
            value = f"unknown tool {call.name!r} (tools: {', '.join(self.tools)})"
        else:
            ok, value = run_with_timeout(self.tools[call.name], call.arguments, self.timeout)
        if not ok:
            state["tool_errors"] = state.get("tool_errors", 0) + 1
            return f"error: {value}"
        return value if isinstance(value, str) else json.dumps(value, default=str)

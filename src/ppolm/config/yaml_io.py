"""Reading and checking config dataclasses: unknown keys with the closest known name, field
types against annotations, ``key=value`` overrides, YAML files that must hold a mapping."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ppolm.errors import ConfigError


def check_keys(cls: type, values: dict[str, Any], where: str) -> None:
    """Raise ConfigError for a key that is not a settable field of ``cls``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of names to values, got {values!r}.")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(known)}."
            raise ConfigError(f"Unknown key {key!r} in {where}.{hint}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``["a=1", "b=x"]`` into ``{"a": 1, "b": "x"}`` (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"Override {pair!r} is not of the form key=value.")
        key, _, raw = pair.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"Cannot parse the value of override {pair!r}: {e}") from None
    return out


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; clear errors for a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {str(p)!r} does not exist.")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(p)!r} must hold a mapping, got {type(data).__name__}.")
    return data


def check_types(obj: Any, where: str = "") -> None:
    """Check each init field against its annotation; ints are accepted where floats are.
    ``where`` prefixes the names in messages (``model.``), so a message names the key a YAML
    file or an override gives."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, str) and _accepts_float(hints[f.name]):
            # YAML 1.1 reads "1e-4" (no dot) as a string; take it as the number it means.
            try:
                value = float(value)
                setattr(obj, f.name, value)
            except ValueError:
                pass
        if not _matches(value, hints[f.name]):
            hint = hints[f.name]
            if _choices(hint) and isinstance(value, str):      # a wrong word, not a wrong type
                raise ConfigError(f"{where}{f.name}={value!r} is not a choice: use "
                                  f"{_describe(hint)}.")
            raise ConfigError(f"{where}{f.name}={value!r} has the wrong type: expected "
                              f"{_describe(hint)}, got {type(value).__name__}.")


def _choices(hint: Any) -> bool:
    """Whether ``hint`` is a Literal of words (or one of a union)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_choices(h) for h in typing.get_args(hint))
    return typing.get_origin(hint) is typing.Literal


def _accepts_float(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if hint is Any:
        return True
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def commented_yaml(values: dict[str, Any], defaults: dict[str, Any], note: str = "") -> str:
    """``values`` as YAML (as ``yaml.safe_dump`` writes them, one level of sub-mappings), with
    ``# default: X`` after each setting whose value differs from ``defaults`` (the same shape),
    and ``note`` as a comment on top."""
    lines = [f"# {line}".rstrip() for line in note.splitlines()]

    def put(key: str, value: Any, default: Any, indent: str) -> None:
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False,
                              width=1000).rstrip("\n").split("\n")
        if value != default:
            shown = yaml.safe_dump(default, default_flow_style=True, width=1000)
            shown = shown.removesuffix("...\n").strip()        # a scalar's end-of-document mark
            text[0] += f"  # default: {shown}"
        lines.extend(indent + t for t in text)

    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and value:
            lines.append(f"{key}:")
            for k, v in value.items():
                put(k, v, default.get(k), "  ")
        else:
            put(key, value, default, "")
    return "\n".join(lines) + "\n"

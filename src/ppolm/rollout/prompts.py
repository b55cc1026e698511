"""Prompts from anywhere a Hugging Face user keeps them: a list, a prompts file, a
``datasets.Dataset`` (or a JSONL/Parquet file, or a folder or name that
``datasets.load_dataset`` reads locally), as strings or as chat message lists.

A table's ``prompt`` column holds the prompts; every other column travels with them and reaches
the reward function as keyword lists aligned with the responses (``ppolm.rollout.rewards``).
A message list (``[{"role": "user", "content": ...}]``, a system message allowed) goes through
the tokenizer's chat template, ending with the assistant's turn; its special tokens come from
the template, so nothing else is added.

``datasets`` is imported only for the sources that need it (the ``datasets`` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppolm.errors import DataError
from ppolm.rollout.tools import tools_system_prompt

PROMPT_COLUMN = "prompt"
ROLES = ("system", "user", "assistant", "tool")
#: Files read by ``read_prompts`` (strings only) and by ``read_table`` (prompt and columns).
TEXT_FILES = (".txt", ".json", "")
TABLE_FILES = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
DATASETS_INSTALL = 'pip install "ppolm[datasets]" (or pip install datasets)'


@dataclass
class PromptSet:
    """Prompts ready for sampling: the text each one is (a message list rendered by the chat
    template), its token ids, the other columns, one value per prompt, and each prompt's
    message list when it was given as one (None for a string prompt)."""

    texts: list[str]
    ids: list[list[int]]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    messages: list[list[dict[str, str]] | None] = field(default_factory=list)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.txt`` (one per line; ``\\n`` escapes a newline inside a prompt),
    ``.jsonl`` (one object with a string "prompt" key per line) or ``.json`` (a list of
    strings). For other columns and chat messages, see ``load_prompts``."""
    p = Path(path)
    text = _read_text(p)
    try:
        if p.suffix == ".json":
            prompts = json.loads(text)
            if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                raise DataError(f"{str(p)!r} must hold a JSON list of strings.")
            return prompts
        if p.suffix == ".jsonl":
            rows = _jsonl_rows(p, text)
            if not all(isinstance(r.get("prompt"), str) for r in rows):
                raise DataError(f"each line of {str(p)!r} must be an object with a string "
                                "'prompt' field.")
            return [r["prompt"] for r in rows]
    except json.JSONDecodeError as e:
        raise DataError(f"Prompts file {str(p)!r} is not valid JSON: {e}") from None
    if p.suffix not in (".txt", ""):
        raise DataError(f"Prompts file {str(p)!r}: use .txt (one per line), .jsonl or .json.")
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def load_prompts(source: Any) -> tuple[list[Any], dict[str, list[Any]]]:
    """The prompts (strings or message lists) and the other columns of ``source``: a list (of
    prompts, or of dicts read as table rows with a ``prompt`` key, as
    ``datasets.Dataset.from_list`` reads them), a ``datasets.Dataset``, a path (.txt, .json,
    .jsonl, .parquet, .csv, or a dataset folder) or a name that ``datasets.load_dataset`` finds
    (its "train" split)."""
    if isinstance(source, (str, Path)):
        source = _open(source)
    if isinstance(source, list):
        if source and all(isinstance(x, dict) for x in source):
            source = _rows_of_dicts(source)
        else:
            return source, {}
    if type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"prompts is a DatasetDict with splits {sorted(source)}: pass one "
                        "split, e.g. dataset['train'].")
    names = getattr(source, "column_names", None)
    if not isinstance(names, list) or not callable(getattr(source, "to_dict", None)):
        raise DataError(f"prompts must be a list of strings or message lists, a "
                        f"datasets.Dataset, or a path; got {type(source).__name__}.")
    if PROMPT_COLUMN not in names:
        raise DataError(f"the prompts dataset has no {PROMPT_COLUMN!r} column (columns: "
                        f"{names}); rename the one holding the prompts, e.g. "
                        f"dataset.rename_column({_likely_prompt_column(names)!r}, 'prompt').")
    table = source.to_dict()
    prompts = table.pop(PROMPT_COLUMN)
    return list(prompts), {k: list(v) for k, v in table.items()}


def prompt_set(source: Any, tokenizer: Any, add_special_tokens: bool = True,
               chat_template: bool = False, tools: list[dict[str, Any]] | None = None
               ) -> PromptSet:
    """Load ``source`` (see ``load_prompts``) and tokenize it. A string prompt is tokenized
    as it is (with ``add_special_tokens``), or with ``chat_template`` wrapped as a user message;
    a message list always goes through the chat template (with ``tools``: their JSON schemas,
    see ``render_chat``)."""
    prompts, columns = load_prompts(source)
    if not prompts:
        raise DataError("prompts must be a non-empty list of strings or message lists (or a "
                        "prompts file or dataset).")
    texts, ids, given = [], [], []
    for i, p in enumerate(prompts):
        given.append(None if isinstance(p, str) else check_messages(p, i))
        if isinstance(p, str) and not chat_template:
            if not p.strip():
                raise DataError(f"prompt {i} is {p!r}: every prompt must be a non-empty string.")
            texts.append(p)
            ids.append(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
            continue
        messages = given[-1] or check_messages([{"role": "user", "content": p}], i)
        text = render_chat(tokenizer, messages, tools)
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    for i, row in enumerate(ids):
        if not row:
            raise DataError(f"prompt {i} ({texts[i]!r}) tokenizes to no tokens.")
    return PromptSet(texts, ids, columns, given)


def check_messages(messages: Any, index: int) -> list[dict[str, str]]:
    """A chat prompt as a clean list of ``{"role", "content"}`` dicts (keys a table filled with
    None dropped), or a DataError naming the prompt and what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"prompt {index} is {messages!r}: give a non-empty string or a "
                        "non-empty list of chat messages.")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"prompt {index}: message {m!r} must be a dict with a 'role' and a "
                            "string 'content'.")
        if m.get("role") not in ROLES:
            raise DataError(f"prompt {index}: unknown role {m.get('role')!r} in {m!r}; use one "
                            f"of {list(ROLES)}.")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]],
                tools: list[dict[str, Any]] | None = None) -> str:
    """The text of ``messages`` in the tokenizer's chat template, ending with the assistant's
    turn (``add_generation_prompt=True``). ``tools`` (JSON schemas) go to the template; one
    that does not render them (SmolLM2's) gets them in the system message instead
    (``ppolm.rollout.tools.tools_system_prompt``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat message prompts need a tokenizer with a chat template; this one "
                        "has none (give string prompts instead).")
    text: str = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
    if tools:
        with_tools: str = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                        add_generation_prompt=True)
        if with_tools != text:
            return with_tools
        head, rest = ((messages[0]["content"] + "\n\n", messages[1:])
                      if messages[0]["role"] == "system" else ("", messages))
        system = {"role": "system", "content": head + tools_system_prompt(tools)}
        text = tokenizer.apply_chat_template([system, *rest], add_generation_prompt=True,
                                             tokenize=False)
    return text


def _open(path: str | Path) -> Any:
    """A prompts source named by a path or a dataset name."""
    p = Path(path)
    if p.is_file():
        if p.suffix in TABLE_FILES:
            return _table_file(p)
        return read_prompts(p)
    if p.is_dir():
        return _load_dataset(str(p))
    if p.suffix in (*TEXT_FILES[:-1], *TABLE_FILES) or isinstance(path, Path):
        raise DataError(f"Prompts file {str(p)!r} does not exist.")
    return _load_dataset(str(path))


def _table_file(p: Path) -> Any:
    """A JSONL file read here (no dependency); Parquet and CSV through ``datasets``."""
    if p.suffix == ".jsonl":
        try:
            rows = _jsonl_rows(p, _read_text(p))
        except json.JSONDecodeError as e:
            raise DataError(f"Prompts file {str(p)!r} is not valid JSON: {e}") from None
        names = list(dict.fromkeys(k for r in rows for k in r))
        if PROMPT_COLUMN not in names:
            raise DataError(f"the prompts file {str(p)!r} has no {PROMPT_COLUMN!r} field "
                            f"(fields: {names}); name the field holding the prompts "
                            f"{PROMPT_COLUMN!r} (e.g. rename {_likely_prompt_column(names)!r}).")
        return _Rows(names, rows)
    return _load_dataset(TABLE_FILES[p.suffix], data_files=str(p))


#: Column names that usually hold the prompts, for the hint of a missing-column error.
PROMPT_LIKE = ("question", "query", "instruction", "input", "text", "messages", "problem")


def _likely_prompt_column(names: list[str]) -> str:
    """The column most likely to hold the prompts, to name in an error's example."""
    return next((n for n in PROMPT_LIKE if n in names), names[0] if names else "question")


def _rows_of_dicts(rows: list[dict[str, Any]]) -> _Rows:
    """A list of dicts read as table rows (``Dataset.from_list``'s input): each needs a
    ``prompt`` key; its other keys become columns. One chat conversation passed bare (dicts of
    ``role`` and ``content``) is named as such."""
    if all(set(r) <= {"role", "content", "name", "tool_calls"} and "role" in r for r in rows):
        raise DataError("prompts is a list of chat messages, i.e. ONE conversation; give a list "
                        "of conversations (prompts=[messages]), or rows with a 'prompt' key.")
    names = list(dict.fromkeys(k for r in rows for k in r))
    lacking = next((i for i, r in enumerate(rows) if PROMPT_COLUMN not in r), None)
    if lacking is not None:
        raise DataError(f"prompts is a list of dicts, read as table rows, but row {lacking} has "
                        f"no {PROMPT_COLUMN!r} key (keys: {names}); name the key holding the "
                        f"prompts {PROMPT_COLUMN!r} (e.g. rename {_likely_prompt_column(names)!r}),"
                        " as for datasets.Dataset.from_list(rows) or a JSONL file.")
    return _Rows(names, rows)


class _Rows:
    """JSONL rows behind the two members of ``datasets.Dataset`` that ``load_prompts`` uses."""

    def __init__(self, names: list[str], rows: list[dict[str, Any]]) -> None:
        self.column_names, self.rows = names, rows

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: [r.get(k) for r in self.rows] for k in self.column_names}


def _load_dataset(name: str, **kwargs: Any) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"Reading prompts from {name!r} needs the datasets package: "
                        f"{DATASETS_INSTALL}") from None
    try:
        return datasets.load_dataset(name, split="train", **kwargs)
    except Exception as e:  # datasets raises many kinds (not found, offline, bad format)
        raise DataError(f"Cannot load prompts from {name!r} with datasets.load_dataset (split "
                        f"'train'): {type(e).__name__}: {e}. Give a prompts file, a local "
                        "dataset folder, a cached dataset name, or a datasets.Dataset.") from None


def _read_text(p: Path) -> str:
    if not p.is_file():
        raise DataError(f"Prompts file {str(p)!r} does not exist.")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read prompts file {str(p)!r}: {e}") from None


def _jsonl_rows(p: Path, text: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"each line of {str(p)!r} must be a JSON object.")
    return rows

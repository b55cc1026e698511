"""Preference pairs from where users keep them, checked and tokenized.

A pair has ``chosen`` and ``rejected`` (the preferred and the other response), optionally a
``prompt`` before both and a ``margin`` (how strongly chosen is preferred). Sources: a
``datasets.Dataset``, a list of dicts, or a file (.jsonl, .json, .parquet, .csv, or a dataset
folder); ``columns`` renames (``{"chosen": "good"}``: the data's column "good" holds chosen).

Two formats, as TRL's preference datasets:

* strings: the text scored is ``prompt + chosen`` (tokenized with the tokenizer's special
  tokens), so a reward later scores ``prompt + response`` as it was trained;
* conversational: chat message lists (``prompt`` the conversation so far, ``chosen`` and
  ``rejected`` the assistant's messages; without a prompt, each is the whole conversation),
  rendered by the tokenizer's chat template.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppolm.errors import DataError

FIELDS = ("prompt", "chosen", "rejected", "margin")
log = logging.getLogger(__name__)


@dataclass
class PreferencePairs:
    """Tokenized pairs: each side's token ids (and text), the margins (None: no margin column),
    and each pair's row in the source (pairs dropped as too long leave gaps)."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    chosen_text: list[str]
    rejected_text: list[str]
    margin: list[float] | None
    rows: list[int]

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, index: list[int]) -> PreferencePairs:
        """The pairs at positions ``index`` (in that order)."""
        return PreferencePairs([self.chosen[i] for i in index], [self.rejected[i] for i in index],
                               [self.chosen_text[i] for i in index],
                               [self.rejected_text[i] for i in index],
                               None if self.margin is None else [self.margin[i] for i in index],
                               [self.rows[i] for i in index])


def read_rows(source: Any, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The rows of ``source`` with the fields named as ``FIELDS`` (renamed by ``columns``),
    other columns dropped. A missing chosen or rejected column is a DataError naming the row."""
    rename = dict(columns or {})
    bad = [k for k in rename if k not in FIELDS]
    if bad:
        raise DataError(f"columns: unknown {bad}; map {list(FIELDS)} to the data's columns.")
    rows = _rows(source)
    if not rows:
        raise DataError("the preference data holds no pairs.")
    wanted = {name: rename.get(name, name) for name in FIELDS}
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"row {i} is {type(row).__name__}, not a mapping of columns.")
        for name in ("chosen", "rejected"):
            if row.get(wanted[name]) is None:
                raise DataError(
                    f"row {i} has no {wanted[name]!r} column (columns: {sorted(row)}); give "
                    f"pairs with 'chosen' and 'rejected', or say which columns hold them "
                    f"(columns={{'{name}': 'your_column'}}).")
        out.append({name: row.get(col) for name, col in wanted.items()
                    if row.get(col) is not None})
    return out


def pair_texts(row: dict[str, Any], index: int, tokenizer: Any) -> tuple[str, str, bool]:
    """The two texts of a pair and whether they came through the chat template."""
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    chat = [isinstance(x, list) for x in (chosen, rejected)]
    if all(chat) and (prompt is None or isinstance(prompt, list)):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"row {index} holds chat messages, but the tokenizer has no chat "
                            "template; give strings instead.")
        head = _messages(prompt or [], index, "prompt")
        texts = [tokenizer.apply_chat_template(head + _messages(side, index, name),
                                               tokenize=False)
                 for name, side in (("chosen", chosen), ("rejected", rejected))]
        return str(texts[0]), str(texts[1]), True
    if any(chat) or not all(isinstance(x, str) for x in (chosen, rejected)) or \
            not isinstance(prompt, (str, type(None))):
        kinds = {k: type(v).__name__ for k, v in row.items() if k != "margin"}
        raise DataError(f"row {index} mixes formats ({kinds}): give prompt, chosen and "
                        "rejected all as strings, or all as chat message lists.")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"row {index}: {name} is empty ({text!r}); every response must "
                            "hold text.")
    return (prompt or "") + chosen, (prompt or "") + rejected, False


def tokenize_pairs(source: Any, tokenizer: Any, columns: dict[str, str] | None = None,
                   max_length: int | None = None, vocab_size: int | None = None
                   ) -> PreferencePairs:
    """Read, check and tokenize pairs (see the module docstring). Pairs with a side longer
    than ``max_length`` tokens are left out (with a log line); ``vocab_size`` (the model's
    embedding rows) refuses token ids the model cannot read."""
    rows = read_rows(source, columns)
    with_margin = sum("margin" in r for r in rows)
    if with_margin not in (0, len(rows)):
        missing = next(i for i, r in enumerate(rows) if "margin" not in r)
        raise DataError(f"row {missing} has no margin, but other rows do: give every pair a "
                        "margin or none.")
    out = PreferencePairs([], [], [], [], [] if with_margin else None, [])
    dropped = 0
    for i, row in enumerate(rows):
        chosen, rejected, chat = pair_texts(row, i, tokenizer)
        if chosen == rejected:
            raise DataError(f"row {i}: chosen equals rejected ({chosen[-80:]!r}); a pair must "
                            "hold two different responses.")
        ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in (chosen, rejected)]
        if vocab_size is not None and max(max(x) for x in ids if x) >= vocab_size:
            raise DataError(f"row {i} tokenizes to id {max(max(x) for x in ids if x)}, but the "
                            f"model has {vocab_size} embeddings: the tokenizer does not match "
                            "the model.")
        if max_length is not None and max(len(x) for x in ids) > max_length:
            dropped += 1
            continue
        if out.margin is not None:
            out.margin.append(_margin(row["margin"], i))
        out.chosen.append(ids[0])
        out.rejected.append(ids[1])
        out.chosen_text.append(chosen)
        out.rejected_text.append(rejected)
        out.rows.append(i)
    if dropped:
        log.warning("%d of %d pairs left out: a side longer than max_length=%s tokens",
                    dropped, len(rows), max_length)
    if not out.chosen:
        raise DataError(f"every pair is longer than max_length={max_length} tokens; raise it.")
    return out


def _margin(value: Any, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(float(value)):
        raise DataError(f"row {index}: margin {value!r} must be a finite number.")
    return float(value)


def _messages(value: Any, index: int, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value and name != "prompt":
        raise DataError(f"row {index}: {name} must be a non-empty list of chat messages.")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                not isinstance(m.get("role"), str):
            raise DataError(f"row {index}: {name} message {m!r} needs a 'role' and a string "
                            "'content'.")
        if name != "prompt" and not m["content"].strip():
            raise DataError(f"row {index}: {name} has an empty message ({m!r}).")
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _rows(source: Any) -> list[Any]:
    if isinstance(source, (str, Path)):
        return _read_file(Path(source))
    if isinstance(source, list):
        return source
    if type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"the pairs are a DatasetDict with splits {sorted(source)}: pass one "
                        "split, e.g. dataset['train'].")
    to_list = getattr(source, "to_list", None)
    if callable(to_list):                                    # a datasets.Dataset
        return list(to_list())
    raise DataError(f"preference data must be a datasets.Dataset, a list of dicts or a file "
                    f"path; got {type(source).__name__}.")


def _read_file(p: Path) -> list[Any]:
    if not p.exists():
        raise DataError(f"Preference file {str(p)!r} does not exist.")
    try:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        if p.suffix == ".json":
            rows = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataError(f"{str(p)!r} must hold a JSON list of pairs.")
            return rows
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"Preference file {str(p)!r} is not valid JSON: {e}") from None
    kinds = {".parquet": "parquet", ".csv": "csv"}
    try:
        import datasets
    except ImportError:
        raise DataError(f"Reading {str(p)!r} needs the datasets package (pip install "
                        "datasets).") from None
    try:
        if p.is_dir():
            return list(datasets.load_from_disk(str(p)).to_list())
        if p.suffix not in kinds:
            raise DataError(f"Preference file {str(p)!r}: use .jsonl, .json, .parquet or .csv.")
        return list(datasets.load_dataset(kinds[p.suffix], data_files=str(p),
                                          split="train").to_list())
    except (OSError, ValueError) as e:
        raise DataError(f"Cannot read preference pairs from {str(p)!r}: {e}") from None

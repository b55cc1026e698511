"""``ppolm report`` on a finished toy run: one HTML file that parses, with the curves as
inline PNG images, the samples of the first and last iterations, the warnings and the config."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest
import torch

from conftest import toy_trainer
from ppolm import (
    Interaction,
    PPOConfig,
    Reply,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    char_tokenizer,
)
from ppolm.cli import main
from ppolm.errors import ConfigError
from ppolm.evaluation.report import write_report


class Page(HTMLParser):
    """What the test reads of the page: its images, table cells, list items, <pre> text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self.items: list[str] = []
        self.pre = ""
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in ("img", "meta"):                      # void elements: no end tag
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-3:])
        self.open.pop()

    def handle_data(self, data):
        where = self.open[-1] if self.open else ""
        if where == "td":
            self.cells.append(data)
        elif where == "li":
            self.items.append(data)
        elif where == "pre":
            self.pre += data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # 4 tokens of room: the truncation warning fires, so the page has one to show
    toy_trainer(out, iterations=4, log_samples_every=2).train()
    return out


def test_the_report_is_one_page_with_curves_samples_warnings_and_config(finished_run, capsys):
    assert main(["report", str(finished_run)]) == 0
    target = finished_run / "report.html"
    assert f"report: {target}" in capsys.readouterr().out
    page = Page()
    page.feed(target.read_text())
    page.close()
    assert page.open == []                                   # every tag closed
    assert len(page.images) >= 8
    for src in page.images:
        assert src.startswith("data:image/png;base64,")      # no file beside it, no server
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in
               (finished_run / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 2, 4]
    for entry in (samples[0], samples[-1]):                  # first and last iterations
        assert entry["samples"][0]["response"] in page.cells
    warnings = [json.loads(line)["message"] for line in
                (finished_run / "warnings.jsonl").read_text().splitlines()]
    assert warnings and page.items == warnings
    assert "learning_rate: 0.001" in page.pre


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2


class Quiz(Interaction):
    """A tool reply after the first turn and a user reply after the second; after the third,
    a reply to the prompt 'ab' only, which max_turns=3 cuts (the episode truncated)."""

    reply_role = "tool"

    def reply(self, prompt, turns, state):
        if len(turns) == 1:
            return "=42"
        if len(turns) == 2:
            return Reply("again", role="user")
        return "more" if prompt == "ab" else None


def test_multi_turn_samples_and_the_report_show_turns_and_roles(tmp_path):
    torch.manual_seed(0)
    tok = char_tokenizer("0123456789=abgimnor?")
    env = TextGenerationEnv(["a", "ab"], tok, lambda p, r: [0.5] * len(r), max_new_tokens=3,
                            interaction=Quiz(), max_turns=3)
    trainer = Trainer(TransformerPolicy(len(tok), hidden_size=32), env, PPOConfig(
        iterations=1, batch_size=4, minibatch_size=4, progress=False, log_samples_every=1,
        output_dir=str(tmp_path)))
    trainer.train()
    [entry] = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert sorted(s["prompt"] for s in entry["samples"]) == ["a", "a", "ab", "ab"]
    for sample in entry["samples"]:
        turns = sample["turns"]
        assert [m["role"] for m in turns] == ["assistant", "tool", "assistant", "user",
                                              "assistant"]
        assert [turns[1]["text"], turns[3]["text"]] == ["=42", "again"]
        assert sample["truncated"] is (sample["prompt"] == "ab")   # "more" did not fit
        assert sample["response"] == "".join(m["text"] for m in turns)
    page = write_report(tmp_path).read_text()
    assert page.count('<span class="role">tool:</span> =42</div>') == 4
    assert page.count('<span class="role">user:</span> again</div>') == 4
    assert page.count("(truncated: max_turns or max_episode_tokens)") == 2
    assert 'alt="Multi-turn episodes: turns, share truncated, failed tool calls"' in page

"""``ppolm report`` on a finished toy run: one HTML file that parses, with the curves as
inline PNG images, the samples of the first and last iterations, the warnings and the config."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest

from conftest import toy_trainer
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

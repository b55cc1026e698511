"""``ppolm report RUN_DIR``: one self-contained HTML page of a run, read from its files: the
curves of metrics.jsonl (PNG images inlined as base64, so the page opens from disk without a
server), the config, the sampled responses of the first and last recorded iterations
(samples.jsonl) and the health warnings (warnings.jsonl)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from ppolm.checkpoint.folders import latest_checkpoint
from ppolm.errors import ConfigError
from ppolm.observe.metrics import SAMPLE_COLUMNS, read_metrics

#: The panels of the page: a title and the metrics drawn in it (those the run logged).
PANELS = (
    ("Score", ("score_mean", "eval/score_mean")),
    ("Reward (score with the KL penalty)", ("reward_mean",)),
    ("KL to the reference (nats per response)", ("kl", "eval/kl")),
    ("KL coefficient", ("kl_coef",)),
    ("Entropy (nats per token)", ("entropy",)),
    ("approx_kl and clip fraction", ("approx_kl", "clipfrac")),
    ("Explained variance", ("explained_variance",)),
    ("Losses", ("policy_loss", "value_loss")),
    ("Gradient norm", ("grad_norm",)),
    ("Response length (tokens)", ("response_length", "eval/response_length")),
    ("Share of responses that ended", ("eos_fraction", "eval/eos_fraction")),
    ("Multi-turn episodes: turns, share truncated, failed tool calls",
     ("turns_mean", "truncated_fraction", "tool_errors_mean")),
    ("Learning rate", ("lr",)),
)
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
img{width:48%;margin:0.5%} table{border-collapse:collapse;font-size:0.9em;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
pre{background:#f5f5f5;padding:1em;overflow:auto;font-size:0.85em}
li.warning{margin-bottom:0.4em} .role{font-weight:bold;color:#555}
.turn{white-space:pre-wrap;margin-bottom:0.3em}"""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path) if path.is_file() else []


def _config_text(run_dir: Path) -> str:
    """The run's config as YAML: run.yaml (the command's) or the newest checkpoint's."""
    if (run_dir / "run.yaml").is_file():
        return (run_dir / "run.yaml").read_text(encoding="utf-8")
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is not None and (found / "config.yaml").is_file():
        return (found / "config.yaml").read_text(encoding="utf-8")
    return "(no run.yaml or checkpoint config found)"


def _curve(title: str, names: tuple[str, ...], rows: list[dict[str, Any]]) -> str | None:
    """One panel as an <img> with a base64 PNG; None when the run logged none of its
    metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name in names:
        points = [(r["iteration"], r[name]) for r in rows
                  if isinstance(r.get(name), (int, float))]
        if points:
            series[name] = points
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=80)
    for name, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def _samples_table(entry: dict[str, Any]) -> str:
    head = "".join(f"<th>{c}</th>" for c in SAMPLE_COLUMNS)
    body = []
    for sample in entry["samples"]:
        cells = []
        for c in SAMPLE_COLUMNS:
            v = sample.get(c)
            if c == "response" and isinstance(sample.get("turns"), list):
                cells.append(f"<td>{_turns(sample)}</td>")
                continue
            cells.append(f"<td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}"
                         "</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h3>Iteration {entry['iteration']}</h3><table><tr>{head}</tr>"
            + "".join(body) + "</table>")


def _turns(sample: dict[str, Any]) -> str:
    """A multi-turn episode's messages, each under its role (samples.jsonl's ``turns``)."""
    out = [f'<div class="turn"><span class="role">{html.escape(str(m.get("role")))}:</span> '
           f'{html.escape(str(m.get("text")))}</div>' for m in sample["turns"]
           if isinstance(m, dict)]
    if sample.get("truncated"):
        out.append('<div class="turn"><i>(truncated: max_turns or max_episode_tokens)</i></div>')
    return "".join(out)


def _summary(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>metrics.jsonl holds no iteration.</p>"
    last = rows[-1]
    parts = [f"{len(rows)} iterations"]
    for name in ("score_mean", "kl", "eval/score_mean"):
        if isinstance(last.get(name), (int, float)):
            parts.append(f"last {name} {last[name]:.4g}")
    return "<p>" + html.escape("; ".join(parts)) + ".</p>"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run in ``run_dir`` (default ``run_dir/report.html``);
    returns its path. Needs matplotlib."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{str(run_dir)!r} holds no metrics.jsonl: give the output_dir of a "
                          "ppolm run.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("ppolm report draws its curves with matplotlib: pip install "
                          "matplotlib  (or pip install 'ppolm[report]').") from None
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    samples = _read_jsonl(run_dir / "samples.jsonl")
    warned = _read_jsonl(run_dir / "warnings.jsonl")
    images = [img for title, names in PANELS if (img := _curve(title, names, rows))]
    shown = samples[:1] + samples[-1:] if len(samples) > 1 else samples
    warnings = "".join(f'<li class="warning">{html.escape(str(w.get("message", w)))}</li>'
                       for w in warned) or "<li>none</li>"
    title = html.escape(f"ppolm run {run_dir.resolve().name}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>{_summary(rows)}"
            f"<h2>Curves</h2>{''.join(images)}"
            f"<h2>Health warnings</h2><ul>{warnings}</ul>"
            f"<h2>Samples</h2>{''.join(_samples_table(e) for e in shown) or '<p>none</p>'}"
            f"<h2>Config</h2><pre>{html.escape(_config_text(run_dir))}</pre>"
            "</body></html>\n")
    target = Path(out) if out is not None else run_dir / "report.html"
    target.write_text(page, encoding="utf-8")
    return target

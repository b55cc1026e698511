"""Preference pairs from every source and format, and the errors for bad pairs, tokenizers and
models: each names the row or the mismatch."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPHABET, tiny_llama
from ppolm import ConfigError, DataError, char_tokenizer
from ppolm.config.reward_model import RewardModelConfig
from ppolm.policies.reward_model import RewardModel
from ppolm.reward_modeling.data import tokenize_pairs
from ppolm.reward_modeling.trainer import RewardModelTrainer

ROWS = [{"prompt": "ab", "chosen": "cc", "rejected": "d", "margin": 0.5},
        {"prompt": "j", "chosen": "aaa", "rejected": "bb", "margin": 1.0}]
# a template whose output the character tokenizer reads: j before a user turn, i before the
# assistant's
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}j{% else %}i{% endif %}"
            "{{ m['content'] }}{% endfor %}")


def tok_with_template():
    tok = char_tokenizer(ALPHABET)
    tok.chat_template = TEMPLATE
    return tok


def test_every_source_gives_the_same_pairs(tmp_path):
    import datasets

    tok = char_tokenizer(ALPHABET)
    expect = tokenize_pairs(ROWS, tok)
    assert expect.chosen_text == ["abcc", "jaaa"] and expect.margin == [0.5, 1.0]
    assert expect.chosen[0] == tok("abcc")["input_ids"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    for source in (ds, tmp_path / "p.jsonl", str(tmp_path / "p.parquet"), tmp_path / "p.csv"):
        got = tokenize_pairs(source, tok)
        assert (got.chosen, got.rejected, got.margin) == (expect.chosen, expect.rejected,
                                                          expect.margin), source


def test_columns_are_renamed():
    tok = char_tokenizer(ALPHABET)
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    got = tokenize_pairs(rows, tok, columns={"prompt": "q", "chosen": "good",
                                             "rejected": "bad"})
    assert got.chosen_text == ["abcc", "jaaa"] and got.margin is None


def test_conversational_pairs_go_through_the_chat_template():
    tok = tok_with_template()
    rows = [{"prompt": [{"role": "user", "content": "ab"}],
             "chosen": [{"role": "assistant", "content": "cc"}],
             "rejected": [{"role": "assistant", "content": "d"}]},
            {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "a"},
                          {"role": "assistant", "content": "c"}]}]
    got = tokenize_pairs(rows, tok)
    assert got.chosen_text == ["jabicc", "jaib"] and got.rejected_text == ["jabid", "jaic"]
    assert got.chosen[0] == tok("jabicc", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("rows, match", [
    ([ROWS[0], {"prompt": "a", "chosen": "b"}], "row 1 has no 'rejected' column"),
    ([ROWS[1], {"prompt": "a", "chosen": "bc", "rejected": "bc", "margin": 0.0}],
     "row 1: chosen equals"),
    ([{"prompt": "a", "chosen": " ", "rejected": "b"}], "row 0: chosen is empty"),
    ([{"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}],
     "row 0 mixes formats"),
    ([ROWS[0], {"prompt": "a", "chosen": "b", "rejected": "c"}], "row 1 has no margin"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c", "margin": float("nan")}],
     "row 0: margin nan"),
])
def test_bad_pairs_are_named_by_row(rows, match):
    with pytest.raises(DataError, match=match):
        tokenize_pairs(rows, char_tokenizer(ALPHABET))


def test_renamed_column_missing_says_how_to_map_it():
    with pytest.raises(DataError, match="columns=.*'chosen': 'your_column'"):
        tokenize_pairs([{"good": "a", "rejected": "b"}], char_tokenizer(ALPHABET))


def test_long_pairs_are_left_out_and_all_too_long_is_an_error():
    tok = char_tokenizer(ALPHABET)
    rows = [ROWS[0], {**ROWS[1], "chosen": "aaaaaa"}]
    got = tokenize_pairs(rows, tok, max_length=4)
    assert got.rows == [0]
    with pytest.raises(DataError, match="every pair is longer"):
        tokenize_pairs(ROWS, tok, max_length=2)


def test_a_tokenizer_larger_than_the_model_is_refused():
    tok = char_tokenizer(ALPHABET)
    model = tiny_llama(len(tok) - 3)           # the last characters have no embedding
    with pytest.raises(DataError, match="does not match the model|embeddings only"):
        RewardModelTrainer(model, tok, ROWS, RewardModelConfig(batch_size=1, progress=False))


def test_more_than_one_label_is_refused():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, num_labels=2, pad_token_id=0)
    with pytest.raises(ConfigError, match="num_labels=2"):
        RewardModel(LlamaForSequenceClassification(cfg))


def test_scores_do_not_depend_on_the_padding_side():
    tok = char_tokenizer(ALPHABET)
    model = RewardModel(tiny_llama(len(tok))).eval()
    scores = []
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(["abc", "abcdefgh", "j"], return_tensors="pt", padding=True)
        scores.append(model(enc.input_ids, enc.attention_mask))
    alone = torch.cat([model(**{k: v for k, v in tok([t], return_tensors="pt").items()
                                if k != "token_type_ids"}) for t in ["abc", "abcdefgh", "j"]])
    assert torch.allclose(scores[0], scores[1], atol=1e-6)
    assert torch.allclose(scores[0], alone, atol=1e-6)

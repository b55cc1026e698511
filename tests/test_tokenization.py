from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from ppolm import char_tokenizer
from ppolm.errors import DataError


@pytest.mark.parametrize("text", ["abc", "j", "hij abc", "a\nb c", "aaaa  bbb"])
def test_round_trip_without_inserted_spaces(text):
    tok = char_tokenizer("abcdefghij \n")
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_special_tokens_and_padding_side():
    tok = char_tokenizer("xyz")
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert len(tok) == 4 + 3
    batch = tok(["x", "xyz"], padding=True)
    assert batch["input_ids"][0] == [0, 0, 4]           # left padding
    assert tok.decode([4, 5, 1, 0], skip_special_tokens=True) == "xy"


def test_bad_alphabets():
    with pytest.raises(DataError):
        char_tokenizer("")

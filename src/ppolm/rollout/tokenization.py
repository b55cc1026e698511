"""Tokenizers for toy tasks, built with the `tokenizers` library."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ppolm.errors import DataError

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``alphabet`` with pad, eos, bos and unk tokens.

    Ids: 0 pad, 1 eos, 2 bos, 3 unk, then one id per character in the order given.
    Decoding the ids of a string over the alphabet gives the string back (no spaces inserted).
    Padding is on the left, as decoder-only generation wants.
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise DataError("char_tokenizer needs a non-empty alphabet.")
    specials = [PAD, EOS, BOS, UNK]
    clash = [c for c in chars if c in specials]
    if clash:
        raise DataError(f"alphabet characters {clash} clash with special tokens.")
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, eos_token=EOS,
                                  bos_token=BOS, unk_token=UNK, padding_side="left")
    return tok

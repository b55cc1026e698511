"""Prefix-shared packing of preference pairs: the tree layout and mask worked by hand, packed
scores and gradients equal to the plain forward's on several model families, the trainer
equal with and without it, and packing turned off for a model whose attention cannot take it."""

from __future__ import annotations

import itertools
import logging
import random

import pytest
import torch
import transformers as tf

from conftest import ALPHABET, tiny_gpt2, tiny_llama
from ppolm import char_tokenizer
from ppolm.config.reward_model import RewardModelConfig
from ppolm.policies.reward_model import RewardModel
from ppolm.reward_modeling.batches import pair_batch, score_pairs
from ppolm.reward_modeling.data import PreferencePairs, tokenize_pairs
from ppolm.reward_modeling.packing import fill_rows, pack_pairs, pair_groups, shared_prefix
from ppolm.reward_modeling.trainer import RewardModelTrainer
from test_reward_model_trainer import trainer

V = len(char_tokenizer(ALPHABET))
NEG = torch.finfo(torch.float32).min


def test_shared_prefix_leaves_each_side_a_token():
    assert shared_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert shared_prefix([1, 2, 3], [1, 2]) == 1          # rejected keeps its last token
    assert shared_prefix([7, 8], [9, 8]) == 0
    assert shared_prefix([5], [5]) == 0


def test_one_tree_by_hand():
    """chosen 1 2 3 4, rejected 1 2 5: tokens 1 2 | 3 4 | 5 at positions 0 1 | 2 3 | 2."""
    p = pack_pairs([[1, 2, 3, 4]], [[1, 2, 5]], pad_id=0, row_tokens=100)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    allowed = (p.attention_mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],          # 1: itself
                       [1, 1, 0, 0, 0],          # 2: the prefix, causally
                       [1, 1, 1, 0, 0],          # 3: prefix and itself
                       [1, 1, 1, 1, 0],          # 4: prefix, 3, itself
                       [1, 1, 0, 0, 1]]          # 5: prefix and itself, not the chosen side
    assert set(p.attention_mask.unique().tolist()) == {0.0, NEG}
    assert p.chosen_at.tolist() == [[0, 3]] and p.rejected_at.tolist() == [[0, 4]]
    assert p.read_at.tolist() == [[0, 3], [0, 4]] and p.real == 5 and p.pairs == 1


def test_two_trees_in_a_row_are_block_diagonal_and_padding_sees_itself():
    p = pack_pairs([[1, 2], [3, 4, 5]], [[1, 6], [7]], pad_id=0, row_tokens=100)
    # tree of pair 1 (4 tokens: 3 4 5 | 7) goes first (largest), then pair 0 (1 | 2 | 6)
    assert p.input_ids.tolist() == [[3, 4, 5, 7, 1, 2, 6]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 1]]
    allowed = (p.attention_mask[0, 0] == 0).int()
    assert allowed[:4, 4:].sum() == 0 and allowed[4:, :4].sum() == 0
    assert p.chosen_at.tolist() == [[0, 5], [0, 2]]
    assert p.rejected_at.tolist() == [[0, 6], [0, 3]]
    padded = pack_pairs([[1, 2, 3, 4, 5], [6, 7]], [[1, 9], [6, 8]], pad_id=0, row_tokens=4)
    assert padded.input_ids.shape == (2, 6) and padded.real == 6 + 3
    row = 1 if padded.input_ids[1, -1] == 0 else 0
    pad_cols = (padded.input_ids[row] == 0).nonzero().flatten().tolist()
    for c in pad_cols:
        assert (padded.attention_mask[row, 0, c] == 0).nonzero().flatten().tolist() == [c]


def test_rows_are_filled_evenly_and_hold_every_tree_once():
    sizes = [30, 5, 17, 22, 9, 41, 3, 12]
    fills = fill_rows(sizes, row_tokens=50)
    # 139 tokens: 3 rows, the largest tree first into the least filled row:
    # loads 41 30 22 -> 17 to r2 (39), 12 to r1 (42), 9 to r2 (48), 5 to r0 (46), 3 to r1 (45)
    assert fills == [[5, 1], [0, 7, 6], [3, 2, 4]]
    assert [sum(sizes[k] for k in row) for row in fills] == [46, 45, 48]
    assert fill_rows([300, 10], row_tokens=256) == [[0], [1]]


def random_pairs(n: int, seed: int = 0) -> PreferencePairs:
    rng = random.Random(seed)
    chosen, rejected = [], []
    for _ in range(n):
        prompt = [rng.randrange(3, V) for _ in range(rng.randint(1, 9))]
        chosen.append(prompt + [rng.randrange(3, V) for _ in range(rng.randint(1, 7))])
        rejected.append(prompt + [rng.randrange(3, V) for _ in range(rng.randint(1, 7))])
    return PreferencePairs(chosen, rejected, [""] * n, [""] * n, None, list(range(n)))


def families():
    yield "llama", tiny_llama(V)
    yield "gpt2", tiny_gpt2(V)
    yield "qwen2", tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64))
    yield "gpt_neox", tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64))
    yield "llama eager", tf.LlamaForCausalLM._from_config(tiny_llama(V).config,
                                                           attn_implementation="eager")


@pytest.mark.parametrize("name", [n for n, _ in families()])
def test_packed_scores_and_gradients_equal_the_plain_forward(name):
    torch.manual_seed(0)
    model = RewardModel(dict(families())[name]).eval()
    pairs, index = random_pairs(12), list(range(12))
    grads = []
    for packed in (False, True):
        model.zero_grad()
        batch = pair_batch(pairs, index, 0, packed=packed, dtype=model.dtype)
        c, r = score_pairs(model, batch)
        (c - r).pow(2).sum().backward()
        grads.append(([c.detach(), r.detach()],
                      [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (plain, g_plain), (packed, g_packed) = grads
    plain_batch = pair_batch(pairs, index, 0)
    packed_batch = pair_batch(pairs, index, 0, packed=True)
    assert packed_batch.input_ids.numel() < plain_batch.input_ids.numel()   # prompts once
    for a, b in zip(plain, packed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert len(g_plain) == len(g_packed) > 0
    for a, b in zip(g_plain, g_packed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_training_packed_equals_training_plain():
    packed, plain = trainer(steps=3, packing=True), trainer(steps=3, packing=False)
    assert packed.packed and not plain.packed
    rp, rq = packed.train(), plain.train()
    for a, b in zip(rp, rq, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["accuracy"] == b["accuracy"]
    assert rp[-1]["eval/accuracy"] == rq[-1]["eval/accuracy"]
    for p, q in zip(packed.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2,
                                               n_head=4)),       # ALiBi from a 2-D mask: fails
    lambda: tf.MptForCausalLM(tf.MptConfig(vocab_size=V, d_model=32, n_layers=2,
                                           n_heads=4)),          # ALiBi ignores positions
], ids=["bloom", "mpt"])
def test_a_model_that_cannot_pack_trains_plain_with_a_warning(make, caplog):
    with caplog.at_level(logging.WARNING, logger="ppolm.reward_modeling.trainer"):
        t = trainer(steps=1, model=make())
    assert not t.packed
    assert "packing is off" in caplog.text
    assert t.train()[-1]["loss"] > 0


def test_texts_that_pairs_share_run_once_in_one_tree():
    """Prompt 1 2 3, responses A = 4 5, B = 6, C = 7 8 9 compared as A>B, A>C, C>B."""
    A, B, C = [1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 2, 3, 7, 8, 9]
    p = pack_pairs([A, A, C], [B, C, B], pad_id=0, row_tokens=100)
    # distinct texts in order of first appearance (chosen sides, then rejected): A, C, B
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 6]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 3]]
    allowed = (p.attention_mask[0, 0] == 0).int()
    assert allowed[8].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 1]          # B: prompt and itself
    assert allowed[7].tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 0]          # C's last token
    assert p.chosen_at.tolist() == [[0, 4], [0, 4], [0, 7]]
    assert p.rejected_at.tolist() == [[0, 8], [0, 7], [0, 8]]
    assert p.real == 9


def test_pairs_linked_by_a_shared_text_are_one_group():
    A, B, C, D, E, F, G = ([i] for i in range(3, 10))
    assert pair_groups([A, C, B, F, D], [B, D, E, G, A]) == [[0, 1, 2, 4], [3]]
    assert pair_groups([A, C], [B, D]) == [[0], [1]]


def ranked_rows(prompts: int, k: int, seed: int = 0) -> list[dict[str, str]]:
    """k responses per prompt compared each with each: more 'a's is chosen (ties skipped)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(prompts):
        prompt = "".join(rng.choice("bcdefghij") for _ in range(rng.randint(3, 6))) + "j"
        answers = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 8)))
                   for _ in range(k)]
        for x, y in itertools.combinations(answers, 2):
            if x.count("a") != y.count("a") and x != y:
                good, bad = (x, y) if x.count("a") > y.count("a") else (y, x)
                rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def test_ranked_responses_score_as_separate_texts_in_fewer_tokens():
    torch.manual_seed(0)
    model = RewardModel(tiny_llama(V)).eval()
    tok = char_tokenizer(ALPHABET)
    pairs = tokenize_pairs(ranked_rows(3, 4), tok)
    index = list(range(len(pairs)))
    with torch.no_grad():
        plain = score_pairs(model, pair_batch(pairs, index, 0))
        packed_batch = pair_batch(pairs, index, 0, packed=True)
        packed = score_pairs(model, packed_batch)
    for a, b in zip(plain, packed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    distinct = {tuple(t) for t in pairs.chosen + pairs.rejected}
    assert packed_batch.real < sum(len(t) for t in distinct)       # and each prompt once


def test_grouped_batches_hold_whole_groups_shuffled_each_epoch():
    tok = char_tokenizer(ALPHABET)
    data = ranked_rows(40, 3, seed=1)
    cfg = RewardModelConfig(batch_size=6, group_pairs=True, epochs=2, progress=False,
                            learning_rate=1e-3)
    t = RewardModelTrainer(tiny_llama(V), tok, data, cfg)
    group_of = {k: g for g, members in enumerate(t.groups) for k in members}
    sizes = {g: len(m) for g, m in enumerate(t.groups)}
    assert max(sizes.values()) <= 3 and len(t.groups) < len(data)
    epochs = []
    for epoch in range(2):
        order = [k for s in range(t.steps_per_epoch)
                 for k in t.batch_index(epoch * t.steps_per_epoch + s)]
        assert len(set(order)) == len(order) == t.steps_per_epoch * 6
        # consecutive: a group's pairs come together (split only at a batch's end)
        runs = [group_of[order[0]]]
        for k in order[1:]:
            if group_of[k] != runs[-1]:
                runs.append(group_of[k])
        assert len(runs) == len(set(runs))
        epochs.append(order)
    assert epochs[0] != epochs[1]
    again = RewardModelTrainer(tiny_llama(V), tok, data, cfg)
    assert [again.batch_index(s) for s in range(3)] == [t.batch_index(s) for s in range(3)]
    assert all(r["loss"] > 0 for r in t.train())

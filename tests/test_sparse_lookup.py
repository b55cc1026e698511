"""Sparse embedding gradients: the optimizer gets exactly the dense gradient of the default
backward, for tied tables (the head's gradient absorbs the rows), untied ones (a persistent
buffer) and a separate critic; the modules' flags are restored after the update."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from ppolm import (
    HFPolicy,
    PPOConfig,
    TextGenerationEnv,
    Trainer,
    TransformerPolicy,
    ValueHead,
    char_tokenizer,
)
from ppolm.tasks import make_task


def build(kind: str, tmp_path) -> Trainer:
    task = make_task("continue")
    tok = char_tokenizer(task.alphabet)
    if kind == "transformer":        # tied token table, untied position table, shared value head
        policy, value = TransformerPolicy(len(tok), hidden_size=32), None
    else:                            # HF Llama, untied tables, and a separate critic
        policy = HFPolicy(tiny_llama(len(tok)))
        value = ValueHead.separate(policy)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=4, seed=0)
    cfg = PPOConfig(iterations=2, batch_size=8, minibatch_size=4, micro_batch_size=2,
                    ppo_epochs=1, progress=False, output_dir=str(tmp_path))
    return Trainer(policy, env, cfg, value_head=value)


def grads(trainer: Trainer) -> list[torch.Tensor | None]:
    """Copies of the gradients (None for a parameter the loss does not reach, such as the
    separate critic's unused LM head); every gradient must be dense."""
    assert all(p.grad is None or p.grad.layout == torch.strided for p in trainer.params)
    return [None if p.grad is None else p.grad.clone() for p in trainer.params]


@pytest.mark.parametrize("kind", ["transformer", "hf"])
def test_sparse_lookups_give_the_dense_gradient(kind, tmp_path):
    trainer = build(kind, tmp_path)
    assert trainer.lookups.embeddings        # there are trained tables to make sparse
    _, rollout = trainer.collect()
    rollout = trainer.compute_advantages(rollout)
    halves = [rollout.select(torch.arange(0, 4)), rollout.select(torch.arange(4, 8))]
    dense = []
    for mb in halves:
        trainer.accumulate_gradients(mb)     # outside active(): the default dense backward
        dense.append(grads(trainer))
    buffers = []
    with trainer.lookups.active():
        # The first minibatch finds which tables need a buffer; the second uses them.
        for mb, want in zip(halves, dense, strict=True):
            trainer.accumulate_gradients(mb)
            for got, w in zip(grads(trainer), want, strict=True):
                assert (got is None) == (w is None)
                if got is not None:
                    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
            buffers.append({m: b.data_ptr() for m, b in trainer.lookups._buffers.items()})
    # Untied tables got a buffer, reused (not reallocated) by the second minibatch.
    assert buffers[0] and buffers[0] == buffers[1]
    if kind == "transformer":                # the tied token table needs none
        assert trainer.policy.tok_emb not in trainer.lookups._buffers
        assert trainer.policy.pos_emb in trainer.lookups._buffers


def test_flags_restored_after_update(tmp_path):
    trainer = build("hf", tmp_path)
    trainer.train()
    assert all(not m.sparse for m in trainer.lookups.embeddings)

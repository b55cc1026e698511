"""Shared fixtures: a character tokenizer and tiny real models (built here, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from ppolm import char_tokenizer

ALPHABET = "abcdefghij"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tok():
    return char_tokenizer(ALPHABET)


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=64, tie_word_embeddings=False,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)   # char_tokenizer's ids
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def toy_trainer(out, **overrides):
    """A Trainer of a small TransformerPolicy on the 'continue' toy task, writing to ``out``;
    ``overrides`` replace PPOConfig fields."""
    from ppolm import PPOConfig, TextGenerationEnv, Trainer, TransformerPolicy
    from ppolm.rollout.tasks import make_task

    torch.manual_seed(0)
    task = make_task("continue")
    tok = char_tokenizer(task.alphabet)
    policy = TransformerPolicy(len(tok), hidden_size=32)
    env = TextGenerationEnv(task.prompts, tok, task.reward, max_new_tokens=4, seed=0)
    settings = dict(iterations=4, batch_size=8, minibatch_size=4, ppo_epochs=2,
                    learning_rate=1e-3, adaptive_kl=True, lr_schedule="linear", save_every=2,
                    keep_checkpoints=10, progress=False, output_dir=str(out))
    return Trainer(policy, env, PPOConfig(**{**settings, **overrides}))


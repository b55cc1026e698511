"""The cache across turns: a later turn goes on from the cache of the turns before and feeds
only what is new (the previous turn's last token and the reply), so every token of an episode
runs through the model once; and what it computes equals a forward pass over the finished
episodes (the token contract), for episodes that end at different turns (cut out of the
cache), turns that end at different steps (holes in the cache) and empty replies, on the
transformer, the LSTM and a transformers model."""

from __future__ import annotations

import pytest
import torch

from ppolm import Interaction, LSTMPolicy, Reply, TextGenerationEnv, TransformerPolicy
from ppolm import char_tokenizer as make_tokenizer
from ppolm.engines.base import Sequences
from ppolm.engines.plain import PlainEngine
from ppolm.policies.hf import HFPolicy

ALPHABET = "0123456789?=ab"


class Uneven(Interaction):
    """Episodes of as many turns as their prompt has characters, replies of different lengths
    (the first one empty), a reward on each turn."""

    replies = ["", "=a", "==ab"]

    def reply(self, prompt, turns, state):
        if len(turns) >= len(prompt):
            return None
        return Reply(self.replies[len(turns) - 1], reward=0.5)


class Fixed(Interaction):
    """The same 3-token reply after every turn."""

    def reply(self, prompt, turns, state):
        return "=ab"


def tiny_llama(vocab: int) -> HFPolicy:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return HFPolicy(LlamaForCausalLM(cfg).eval())


def make_policy(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "transformer":
        return TransformerPolicy(vocab, hidden_size=32)
    if kind == "lstm":
        return LSTMPolicy(vocab, hidden_size=32)
    return tiny_llama(vocab)


def embedding(policy):
    """The module every fed token goes through first."""
    if isinstance(policy, HFPolicy):
        return policy.lm.get_input_embeddings()
    return policy.tok_emb if isinstance(policy, TransformerPolicy) else policy.embed


@pytest.fixture
def tok():
    return make_tokenizer(ALPHABET)


@pytest.mark.parametrize("kind", ["transformer", "lstm", "hf"])
@pytest.mark.parametrize("stops", ["0123", "0123456"])
def test_the_cache_across_turns_computes_what_a_forward_pass_computes(tok, kind, stops):
    policy = make_policy(kind, len(tok))
    # Many characters end a turn: turns end at different steps, and a turn that ends at one
    # and gets the empty reply feeds nothing new (with "0123456", no episode going on after
    # the first turn has anything to feed; with "0123", some do).
    env = TextGenerationEnv(["a", "ab", "abb", "b0a9"], tok, lambda p, r: [0.0] * len(r),
                            max_new_tokens=4, interaction=Uneven(), max_turns=4,
                            stop_token_ids=tok.convert_tokens_to_ids(list(stops)))
    ep = env.sample(policy, 8, 3.0, torch.device("cpu"), torch.Generator().manual_seed(1),
                    indices=[0, 1, 2, 3, 3, 2, 1, 0], record=True)
    turns = ep.turn_info.num_turns.tolist()
    assert turns == [1, 2, 3, 4, 4, 3, 2, 1]                # the cache is cut turn by turn
    mask = ep.response_mask.bool()
    fwd = PlainEngine().forward_response(policy, Sequences(ep.input_ids, ep.attention_mask,
                                                           mask.shape[1]), 3.0)
    assert (fwd.logprobs[mask] - ep.logprobs[mask]).abs().max() < 1e-5
    assert (fwd.hidden[mask] - ep.hidden[mask]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["transformer", "lstm", "hf"])
def test_every_token_of_an_episode_runs_through_the_model_once(tok, kind):
    """Turns of exactly 4 tokens and 3-token replies, every episode going on: the positions
    fed are each episode's tokens but its very last (drawn, never fed). Running the whole
    conversation again each turn would feed 4 turns' episodes about twice that."""
    policy = make_policy(kind, len(tok))
    env = TextGenerationEnv(["ab"], tok, lambda p, r: [0.0] * len(r), max_new_tokens=4,
                            ignore_eos=True, interaction=Fixed(), max_turns=4)
    fed = [0]
    hook = embedding(policy).register_forward_pre_hook(
        lambda module, args: fed.__setitem__(0, fed[0] + args[0].numel()))
    try:
        ep = env.sample(policy, 3, 1.0, torch.device("cpu"), torch.Generator().manual_seed(0),
                        indices=[0, 0, 0], record=True)
    finally:
        hook.remove()
    length = int(ep.attention_mask[0].sum())               # prompt, 4 turns, 3 replies
    assert length == len(env.prompt_ids[0]) + 4 * 4 + 3 * 3
    assert ep.attention_mask.sum(1).tolist() == [length] * 3
    assert fed[0] == 3 * (length - 1)

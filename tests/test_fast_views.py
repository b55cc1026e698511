"""The fast CPU engine's views: what it needs of a policy beyond the Policy contract lives in
``ppolm.engines.fast_cpu.views``, one view per policy kind, and no policy implements it. Each
view's split and embedding entry points give the policy's own trunk."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from ppolm import HFPolicy, LSTMPolicy, TransformerPolicy
from ppolm.engines.fast_cpu.views import (
    AdapterDisabledView,
    FastView,
    HFView,
    LSTMView,
    TransformerView,
    view_of,
)
from ppolm.policies.base import Policy
from ppolm.policies.pretrained import freeze_lower_layers

VOCAB = 14
ENGINE_ONLY = ("head_params", "input_embeds", "trunk_on_embeds", "frozen_depth", "trunk_bottom",
               "trunk_top", "trunk_and_bottom", "bottom_parameters")


def left_padded(batch: int = 3, length: int = 9):
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                        # a left-padded row
    return ids, mask


def test_no_policy_implements_what_only_the_fast_engine_needs():
    from ppolm.policies.lora import AdapterCritic, AdapterDisabled

    for kind in (Policy, HFPolicy, TransformerPolicy, LSTMPolicy, AdapterDisabled,
                 AdapterCritic):
        assert not [m for m in ENGINE_ONLY if hasattr(kind, m)], kind.__name__
    assert all(hasattr(FastView, m) for m in ENGINE_ONLY)       # they are the views'


def test_each_kind_gets_its_view_and_any_other_policy_the_generic_one():
    from test_engines import RunningMean

    class OwnHead(TransformerPolicy):
        def head(self, hidden):
            return super().head(hidden) * 2.0

    transformer = TransformerPolicy(VOCAB, hidden_size=16)
    assert type(view_of(transformer)) is TransformerView
    assert view_of(transformer).head_params() == (transformer.lm_head.weight, None)
    lstm = LSTMPolicy(VOCAB, hidden_size=16)
    assert type(view_of(lstm)) is LSTMView and not view_of(lstm).compiles
    assert view_of(lstm).head_params() == (lstm.lm_head.weight, lstm.lm_head.bias)
    llama = HFPolicy(tiny_llama(VOCAB))
    head = llama.lm.get_output_embeddings()
    assert type(view_of(llama)) is HFView and view_of(llama).head_params() == (head.weight, None)
    # a subclass that makes its own logits: only ``head`` gives them
    assert type(view_of(OwnHead(VOCAB, hidden_size=16))) is TransformerView
    assert view_of(OwnHead(VOCAB, hidden_size=16)).head_params() is None
    generic = view_of(RunningMean(VOCAB))
    assert type(generic) is FastView and generic.head_params() is None
    assert not generic.compiles and not generic.records_bottom and generic.frozen_depth() == 0


@pytest.mark.parametrize("kind", ["transformer", "llama", "gpt2"])
def test_the_trunk_from_input_embeddings_is_the_policys_trunk(kind):
    torch.manual_seed(0)
    policy = {"transformer": lambda: TransformerPolicy(VOCAB, hidden_size=16),
              "llama": lambda: HFPolicy(tiny_llama(VOCAB)),
              "gpt2": lambda: HFPolicy(tiny_gpt2(VOCAB))}[kind]()
    view = view_of(policy)
    ids, mask = left_padded()
    want, _ = policy.trunk(ids, mask)
    got = view.trunk_on_embeds(view.input_embeds(ids, mask), mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-6)


def test_the_split_trunk_is_the_trunk_and_the_layers_are_put_back():
    torch.manual_seed(0)
    policy = freeze_lower_layers(HFPolicy(tiny_llama(VOCAB)), 1)
    view = view_of(policy)
    layers = policy.lm.base_model.layers
    assert view.frozen_depth() == 1 and view.records_bottom
    ids, mask = left_padded()
    want, _ = policy.trunk(ids, mask)
    bottom = view.trunk_bottom(ids, mask, 1)                               # (B, L, H)
    got = view.trunk_top(bottom, ids, mask, 1)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    # the decoding pass gives the same lower-layer output and the trunk's states
    hidden, recorded, _ = view.trunk_and_bottom(ids, mask, 1)
    torch.testing.assert_close(recorded[real], bottom[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden[real], want[real], rtol=0, atol=1e-5)
    # the run-time layer slices are undone: the model holds its own list again
    assert policy.lm.base_model.layers is layers and len(layers) == 2
    assert view.bottom_parameters(1)[0] is policy.lm.get_input_embeddings().weight


def test_a_lora_reference_reuses_the_policys_lower_layers_only_without_adapters_there():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    top = HFPolicy(tiny_llama(VOCAB), peft_config=peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    for name, p in top.named_parameters():
        if "lora_B" in name:                 # trained adapters: the policy is not the reference
            p.data.normal_()
    reference = top.reference_model()
    ref = view_of(reference)
    assert type(ref) is AdapterDisabledView and type(view_of(top)) is HFView
    assert view_of(top).frozen_depth() == 1
    ours = view_of(top).bottom_parameters(1)
    assert all(a is b for a, b in zip(ours, ref.bottom_parameters(1), strict=True))
    ids, mask = left_padded()
    want, _ = reference.trunk(ids, mask)
    got = ref.trunk_top(view_of(top).trunk_bottom(ids, mask, 1), ids, mask, 1)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert not torch.allclose(top.trunk(ids, mask)[0][real], want[real], atol=1e-3)
    everywhere = HFPolicy(tiny_llama(VOCAB), peft_config=peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(NotImplementedError, match="adapters in the lower layers"):
        view_of(everywhere.reference_model()).bottom_parameters(1)

"""What the fast CPU engine needs of a policy beyond the Policy contract, kept here as a *view*
over each policy kind it knows, so that no policy implements anything for this engine.

A view answers, for its policy:

- ``head_params``: the LM head as one linear map (weight, bias), for the fused head
  (``fused.head_logprobs``: logprobs without keeping the logits); None: the engine calls
  ``policy.head``.
- ``input_embeds`` / ``trunk_on_embeds``: the whole-sequence trunk split after the token lookup
  (what ``compile=True`` compiles: the lookup, whose gradient the update makes sparse, stays
  outside the graph).
- ``frozen_depth``, ``trunk_bottom``, ``trunk_top``, ``trunk_and_bottom``,
  ``bottom_parameters``: the trunk split at the depth of its frozen lower layers, so that they
  run once per rollout (``frozen.py``).

``view_of(policy)`` gives the view of the policy's kind; any other Policy gets ``FastView``
itself, which uses the Policy contract alone (the head through ``policy.head``, no compiled
trunk, no frozen-layer reuse): a new policy kind runs on this engine as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from ppolm.policies.base import Policy, positions_from_mask
from ppolm.policies.hf import HFPolicy, decoder_layers, final_norm_name
from ppolm.policies.lora import AdapterDisabled
from ppolm.policies.lstm import LSTMPolicy
from ppolm.policies.transformer import TransformerPolicy, allowed_keys

# The trunk's whole-sequence pass from input embeddings: (embeds (B, L, H), mask (B, L)) ->
# hidden (B, L, H); what ``trunk_top`` runs the upper blocks with (a compiled one, or None).
EmbedsTrunk = Callable[[Tensor, Tensor], Tensor]


class FastView:
    """The engine's view of one policy; this base is the generic one (see the module docstring).

    A subclass overrides what its policy kind can do; the engine tells what a view can do by
    which methods it overrides (``compiles``, ``records_bottom``).
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        """(weight (V, H), bias (V,) or None) when the head is one linear map, else None."""
        return None

    # --- the whole-sequence trunk from input embeddings (what the engine compiles) ------------
    def input_embeds(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The trunk's input embeddings. Shapes: (B, L), (B, L) -> (B, L, H)."""
        raise NotImplementedError(f"{type(self.policy).__name__} has no separate embedding step.")

    def trunk_on_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """``policy.trunk`` over whole sequences (no cache) from ``input_embeds``'s output.
        Shapes: (B, L, H), (B, L) -> (B, L, H)."""
        raise NotImplementedError(f"{type(self.policy).__name__} has no separate embedding step.")

    @property
    def compiles(self) -> bool:
        """Whether the view has the separate embedding step the compiled trunk needs."""
        return type(self).trunk_on_embeds is not FastView.trunk_on_embeds

    # --- the trunk split at a depth (a forward pass in two parts) -----------------------------
    def frozen_depth(self) -> int:
        """How many of the trunk's lower blocks (embeddings included) have no trainable
        parameter, so that their output is a fixed function of the tokens (0: none, or a view
        that cannot split its policy's trunk)."""
        return 0

    def trunk_bottom(self, input_ids: Tensor, attention_mask: Tensor, depth: int) -> Tensor:
        """Hidden states after the embeddings and the first ``depth`` blocks, for every
        position. Shapes: (B, L), (B, L) -> (B, L, H)."""
        raise NotImplementedError(f"{type(self.policy).__name__}'s trunk cannot be split.")

    def trunk_top(self, bottom: Tensor, input_ids: Tensor, attention_mask: Tensor, depth: int,
                  on_embeds: EmbedsTrunk | None = None) -> Tensor:
        """The rest of the trunk on ``trunk_bottom``'s output: ``trunk_top(trunk_bottom(x))``
        equals ``policy.trunk(x)``. ``on_embeds`` stands in for ``trunk_on_embeds`` over the
        upper blocks (the engine passes a compiled one). Shapes: bottom (B, L, H), input_ids,
        attention_mask (B, L) -> (B, L, H)."""
        raise NotImplementedError(f"{type(self.policy).__name__}'s trunk cannot be split.")

    def trunk_and_bottom(self, input_ids: Tensor, attention_mask: Tensor, depth: int,
                         cache: Any = None, use_cache: bool = False
                         ) -> tuple[Tensor, Tensor, Any]:
        """``policy.trunk`` that also returns ``trunk_bottom``'s output for the new tokens, from
        the same pass (the sampler keeps it, so the rollout needs no forward of its own).

        Shapes: as ``trunk``; returns hidden (B, Lnew, H), bottom (B, Lnew, H), cache."""
        raise NotImplementedError(f"{type(self.policy).__name__}'s trunk cannot be split.")

    @property
    def records_bottom(self) -> bool:
        """Whether the view can keep the frozen layers' output from the decoding steps."""
        return type(self).trunk_and_bottom is not FastView.trunk_and_bottom

    def bottom_parameters(self, depth: int) -> list[Tensor]:
        """The parameters ``trunk_bottom(..., depth)`` uses, in a fixed order (to check that a
        reference model shares them)."""
        raise NotImplementedError(f"{type(self.policy).__name__}'s trunk cannot be split.")


class HFView(FastView):
    """An ``HFPolicy`` (LoRA included: its layers then hold the adapters).

    The split runs the base model with a slice of its decoder layers put in place of the whole
    list for the call (``_only``) and the list put back after it. The engine checks
    ``trunk_top(trunk_bottom) == trunk`` on a probe before using the split: models that add to
    ``inputs_embeds`` (GPT-2's positions) fail the check and are never split.
    """

    policy: HFPolicy

    def __init__(self, policy: HFPolicy) -> None:
        super().__init__(policy)
        self._slices: dict[tuple[Any, ...], nn.ModuleList] = {}     # _only's layer slices

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        if type(self.policy).head is not HFPolicy.head:     # a subclass makes its own logits
            return None
        head = self.policy.lm.get_output_embeddings()
        return (head.weight, head.bias) if isinstance(head, nn.Linear) else None

    def input_embeds(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out: Tensor = self.policy.lm.get_input_embeddings()(input_ids)        # (B, L, H)
        return out

    def trunk_on_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.policy.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=positions_from_mask(attention_mask),
                                        use_cache=False)
        hidden: Tensor = out.last_hidden_state
        return hidden

    def _layers(self) -> tuple[str, nn.ModuleList] | None:
        return decoder_layers(self.policy.lm.base_model)

    def frozen_depth(self) -> int:
        lm = self.policy.lm
        found = self._layers()
        if found is None or any(p.requires_grad for p in lm.get_input_embeddings().parameters()):
            return 0
        if len(set(getattr(lm.config, "layer_types", None) or [])) > 1:
            return 0      # per-layer attention kinds are looked up by index: no slicing
        depth = 0
        for layer in found[1]:
            if any(p.requires_grad for p in layer.parameters()):
                break
            depth += 1
        return min(depth, len(found[1]) - 1)      # the final block stays in trunk_top

    @contextlib.contextmanager
    def _only(self, layers: slice, final_norm: bool) -> Iterator[None]:
        """Run the base model with a slice of its decoder layers (and without its final norm)."""
        found = self._layers()
        assert found is not None
        name, full = found
        base = self.policy.lm.base_model
        norm_name = final_norm_name(base)
        norm = getattr(base, norm_name) if norm_name else None
        # The same slice object each time (a compiled graph is guarded on the modules it runs).
        key = (layers.start, layers.stop, id(full))
        if key not in self._slices:
            self._slices[key] = nn.ModuleList(list(full)[layers])
        setattr(base, name, self._slices[key])
        if norm_name and not final_norm:
            setattr(base, norm_name, _IDENTITY)
        try:
            yield
        finally:
            setattr(base, name, full)
            if norm_name:
                setattr(base, norm_name, norm)

    def trunk_bottom(self, input_ids: Tensor, attention_mask: Tensor, depth: int) -> Tensor:
        embeds = self.input_embeds(input_ids, attention_mask)                 # (B, L, H)
        with self._only(slice(0, depth), final_norm=False):
            return self.trunk_on_embeds(embeds, attention_mask)

    def trunk_top(self, bottom: Tensor, input_ids: Tensor, attention_mask: Tensor, depth: int,
                  on_embeds: EmbedsTrunk | None = None) -> Tensor:
        with self._only(slice(depth, None), final_norm=True):
            return (on_embeds or self.trunk_on_embeds)(bottom, attention_mask)

    def trunk_and_bottom(self, input_ids: Tensor, attention_mask: Tensor, depth: int,
                         cache: Any = None, use_cache: bool = False
                         ) -> tuple[Tensor, Tensor, Any]:
        # states[d] is the input of decoder layer d (before the final norm for d < N).
        hidden, states, cache = self.policy.layer_states(input_ids, attention_mask, cache,
                                                         use_cache)
        return hidden, states[depth], cache

    def bottom_parameters(self, depth: int) -> list[Tensor]:
        found = self._layers()
        assert found is not None
        return [*self.policy.lm.get_input_embeddings().parameters(),
                *(p for layer in list(found[1])[:depth] for p in layer.parameters())]


_IDENTITY = nn.Identity()      # stands in for the final norm in trunk_bottom


class AdapterDisabledView(FastView):
    """A LoRA policy's reference (``AdapterDisabled``): the policy's own view run with the
    adapters off. Its lower layers, where they hold no adapter, are the policy's: the engine
    may reuse the policy's frozen-layer output for it."""

    policy: AdapterDisabled

    def __init__(self, reference: AdapterDisabled) -> None:
        super().__init__(reference)
        self.inner = view_of(reference.policy)

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        """The policy's linear head (None when the head holds an adapter)."""
        return self.inner.head_params()

    def bottom_parameters(self, depth: int) -> list[Tensor]:
        """The policy's lower-layer parameters: the same tensors. Refused when an adapter sits
        there (even a frozen one changes the policy's output, not the reference's)."""
        params = self.inner.bottom_parameters(depth)
        adapters = {id(p) for n, p in self.policy.policy.named_parameters() if "lora_" in n}
        if any(id(p) in adapters for p in params):
            raise NotImplementedError("adapters in the lower layers: the reference's differ.")
        return params

    def trunk_top(self, bottom: Tensor, input_ids: Tensor, attention_mask: Tensor, depth: int,
                  on_embeds: EmbedsTrunk | None = None) -> Tensor:
        with self.policy.switched():
            return self.inner.trunk_top(bottom, input_ids, attention_mask, depth, on_embeds)


class TransformerView(FastView):
    """A ``TransformerPolicy``: its tied head, and its trunk from the token plus position
    embeddings (no frozen-layer split: the position embeddings are added to the input)."""

    policy: TransformerPolicy

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        if type(self.policy).head is not TransformerPolicy.head:
            return None
        return self.policy.lm_head.weight, None

    def input_embeds(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        past = attention_mask.shape[1] - input_ids.shape[1]
        pos = positions_from_mask(attention_mask)[:, past:]                # (B, L)
        out: Tensor = self.policy.tok_emb(input_ids) + self.policy.pos_emb(pos)
        return out

    def trunk_on_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        x, allowed = embeds, allowed_keys(attention_mask, embeds.shape[1])
        for block in self.policy.blocks:
            x, _ = block(x, allowed, None)
        out: Tensor = self.policy.ln_f(x)
        return out


class LSTMView(FastView):
    """An ``LSTMPolicy``: its linear head (the recurrence is not split or compiled)."""

    policy: LSTMPolicy

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        if type(self.policy).head is not LSTMPolicy.head:
            return None
        return self.policy.lm_head.weight, self.policy.lm_head.bias


def view_of(policy: Policy) -> FastView:
    """The view of ``policy``'s kind (a subclass included), else the generic ``FastView``."""
    if isinstance(policy, AdapterDisabled):
        return AdapterDisabledView(policy)
    if isinstance(policy, HFPolicy):
        return HFView(policy)
    if isinstance(policy, TransformerPolicy):
        return TransformerView(policy)
    if isinstance(policy, LSTMPolicy):
        return LSTMView(policy)
    return FastView(policy)

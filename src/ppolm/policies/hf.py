"""HFPolicy: any `transformers` causal LM behind the Policy interface.

The only module that imports `transformers` model code.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ppolm.errors import CheckpointError, ConfigError
from ppolm.policies.base import Policy, positions_from_mask
from ppolm.policies.lora import AdapterDisabled, is_peft, load_adapters, unwrap, wrap


class HFPolicy(Policy):
    """Wraps an ``AutoModelForCausalLM`` (an object, or a local folder to load one from).

    The trunk is the model's base model (embeddings and decoder layers, final norm included);
    the head is its output embedding. Position ids follow the attention mask, so left padding
    does not change a sequence's logits.

    LoRA: with ``peft_config`` (a ``peft.LoraConfig``), or given a ``peft.PeftModel``, only the
    adapters are trainable; the reference is this model with its adapters disabled (see
    ``reference_model`` and ``ppolm.policies.lora``), ``save`` writes the adapters alone.

    Args:
        model: a loaded ``PreTrainedModel`` or ``PeftModel``, or the path of a local folder for
            ``AutoModelForCausalLM.from_pretrained``, or the id of a model in the local
            Hugging Face cache (see ``local_model_path``).
        peft_config: adapters to add to the model (``peft.get_peft_model``).
        **from_pretrained_kwargs: passed on when ``model`` is a path (e.g. ``gguf_file``,
            ``quantization_config``).
    """

    def __init__(self, model: Any, peft_config: Any = None, **from_pretrained_kwargs: Any
                 ) -> None:
        super().__init__()
        if isinstance(model, (str, Path)):
            model = _load(local_model_path(model), from_pretrained_kwargs)
        if peft_config is not None:
            model = wrap(model, peft_config)
        self.model = model
        self.model.eval()
        self._slices: dict[tuple[Any, ...], nn.ModuleList] = {}    # _only's decoder-layer slices
        cfg = self.lm.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            raise CheckpointError(f"{type(model).__name__} rescales its logits after the head; "
                                  "HFPolicy does not support such models yet.")
        head = self.lm.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0])
        self.hidden_size = int(head.weight.shape[1])
        self.max_length = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None)
        # transformers 5.x renamed `past_key_values` to `cache`; support both.
        params = inspect.signature(self.lm.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def lm(self) -> Any:
        """The ``transformers`` model (under the PeftModel with LoRA; its layers then hold the
        adapters). A property, not a submodule: its weights are registered once, in ``model``."""
        return unwrap(self.model)

    @property
    def is_lora(self) -> bool:
        """True when the model carries peft adapters."""
        return is_peft(self.model)

    def reference_model(self) -> Policy:
        """With LoRA, this policy with its adapters disabled (no copy of the weights);
        otherwise a frozen copy."""
        return AdapterDisabled(self) if self.is_lora else super().reference_model()

    def trunk(self, input_ids: Tensor, attention_mask: Tensor, cache: Any = None,
              use_cache: bool = False) -> tuple[Tensor, Any]:
        out = self._base(input_ids, attention_mask, cache, use_cache)
        return out.last_hidden_state, (out[self._cache_arg] if use_cache else None)

    def _base(self, input_ids: Tensor, attention_mask: Tensor, cache: Any, use_cache: bool,
              hidden_states: bool = False) -> Any:
        """The base model over the new tokens, position ids following the mask."""
        past = attention_mask.shape[1] - input_ids.shape[1]
        return self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask)[:, past:],
            use_cache=use_cache, output_hidden_states=hidden_states,
            **{self._cache_arg: cache})

    # --- a trunk split at a frozen depth (the Trainer checks trunk_top(trunk_bottom) == trunk
    # on a probe before using it: models that add to inputs_embeds, e.g. GPT-2's positions,
    # fail the check and are never split) -------------------------------------------------------
    def _layers(self) -> tuple[str, nn.ModuleList] | None:
        return decoder_layers(self.lm.base_model)

    def frozen_depth(self) -> int:
        found = self._layers()
        embed = self.lm.get_input_embeddings()
        if found is None or any(p.requires_grad for p in embed.parameters()):
            return 0
        if len(set(getattr(self.lm.config, "layer_types", None) or [])) > 1:
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
        base = self.lm.base_model
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
        embeds = self.input_embeds(input_ids, attention_mask)                            # (B, L, H)
        with self._only(slice(0, depth), final_norm=False):
            return self.trunk_on_embeds(embeds, attention_mask)

    def trunk_top(self, bottom: Tensor, input_ids: Tensor, attention_mask: Tensor, depth: int,
                  on_embeds: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        with self._only(slice(depth, None), final_norm=True):
            return (on_embeds or self.trunk_on_embeds)(bottom, attention_mask)

    def input_embeds(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out: Tensor = self.lm.get_input_embeddings()(input_ids)                # (B, L, H)
        return out

    def trunk_on_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=positions_from_mask(attention_mask),
                                    use_cache=False)
        hidden: Tensor = out.last_hidden_state
        return hidden

    def trunk_and_bottom(self, input_ids: Tensor, attention_mask: Tensor, depth: int,
                         cache: Any = None, use_cache: bool = False
                         ) -> tuple[Tensor, Tensor, Any]:
        # hidden_states[d] is the input of decoder layer d (before the final norm for d < N).
        out = self._base(input_ids, attention_mask, cache, use_cache, hidden_states=True)
        return (out.last_hidden_state, out.hidden_states[depth],
                out[self._cache_arg] if use_cache else None)

    def bottom_parameters(self, depth: int) -> list[Tensor]:
        found = self._layers()
        assert found is not None
        return [*self.lm.get_input_embeddings().parameters(),
                *(p for layer in list(found[1])[:depth] for p in layer.parameters())]

    def head(self, hidden: Tensor) -> Tensor:
        return self.lm.get_output_embeddings()(hidden)

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        if type(self).head is not HFPolicy.head:     # a subclass makes its own logits
            return None
        head = self.lm.get_output_embeddings()
        return (head.weight, head.bias) if isinstance(head, nn.Linear) else None

    def layers(self) -> list[nn.Module]:
        found = self._layers()
        return list(found[1]) if found is not None else []

    def enable_gradient_checkpointing(self) -> list[nn.Module]:
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            return super().enable_gradient_checkpointing()
        # Non-reentrant: works with frozen inputs and with FSDP2. (transformers 5 renamed it.)
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # The decoder layers recompute themselves (only when in training mode).
        return [m for m in self.layers() if getattr(m, "gradient_checkpointing", False)]

    def save(self, path: str | Path) -> None:
        """``save_pretrained``: the whole model, or with LoRA the adapters alone."""
        self.model.save_pretrained(str(path))

    def load(self, path: str | Path) -> None:
        if self.is_lora:
            load_adapters(self.model, path)
            # further adapters (a critic adapter): save_pretrained writes each under its name
            for name in self.model.peft_config:
                if name != "default":
                    load_adapters(self.model, Path(path) / name, adapter_name=name)
        else:
            self.model.load_state_dict(_load(Path(path), {}).state_dict())


_IDENTITY = nn.Identity()      # stands in for the final norm in trunk_bottom


def decoder_layers(base: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The attribute name and the list of a base model's decoder layers (None if not found)."""
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return name, getattr(base, name)
    return None


def final_norm_name(base: nn.Module) -> str | None:
    """The attribute name of a base model's final norm (None if it has none we know)."""
    return next((n for n in ("norm", "ln_f", "final_layer_norm")
                 if isinstance(getattr(base, n, None), nn.Module)), None)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")     # "name" or "org/name"


def local_model_path(name: str | Path) -> Path:
    """A local file or folder as it is; a Hub id (``"org/name"``, a string that is no existing
    path) resolved to its snapshot folder in the local Hugging Face cache (``HF_HUB_CACHE``,
    else huggingface_hub's default). Nothing is downloaded, so ``HF_HUB_OFFLINE=1`` changes
    nothing; a ConfigError says how to fetch a model that is not cached."""
    path = Path(name)
    if isinstance(name, Path) or path.exists() or not _HUB_ID.match(name):
        return path
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=cache))
    except Exception as e:  # not cached (LocalEntryNotFoundError), or a broken cache entry
        raise ConfigError(
            f"model {name!r} is neither a local folder nor a model in the Hugging Face cache "
            f"({cache or 'the default cache'}): {type(e).__name__}. Download it first (e.g. "
            f"`hf download {name}`), or give the path of a local model folder.") from None


def _load(path: Path, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    if not path.exists():
        raise CheckpointError(f"Model path {str(path)!r} does not exist; give a local folder "
                              "(or file) with a transformers causal LM.")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot load a causal LM from {str(path)!r}: {e}") from None

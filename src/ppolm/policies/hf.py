"""HFPolicy: any `transformers` causal LM behind the Policy interface.

The only module that imports `transformers` model code.
"""

from __future__ import annotations

import inspect
import os
import re
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

    def select_cache(self, cache: Any, rows: Tensor) -> Any:
        """``Cache.batch_select_indices`` (in place), for the caches of transformers that have
        it (``DynamicCache``); None for others."""
        select = getattr(cache, "batch_select_indices", None)
        if select is None:
            return None
        select(rows)
        return cache

    def _base(self, input_ids: Tensor, attention_mask: Tensor, cache: Any, use_cache: bool,
              hidden_states: bool = False) -> Any:
        """The base model over the new tokens, position ids following the mask."""
        past = attention_mask.shape[1] - input_ids.shape[1]
        return self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask)[:, past:],
            use_cache=use_cache, output_hidden_states=hidden_states,
            **{self._cache_arg: cache})

    def layer_states(self, input_ids: Tensor, attention_mask: Tensor, cache: Any = None,
                     use_cache: bool = False) -> tuple[Tensor, tuple[Tensor, ...], Any]:
        """``trunk`` that also returns, from the same pass, the input of every decoder layer
        (``states[d]``: the input of layer d; the embeddings' output for d = 0).

        Shapes: as ``trunk``; returns hidden (B, Lnew, H), states (N + 1 of (B, Lnew, H)),
        cache."""
        out = self._base(input_ids, attention_mask, cache, use_cache, hidden_states=True)
        return (out.last_hidden_state, tuple(out.hidden_states),
                out[self._cache_arg] if use_cache else None)

    def head(self, hidden: Tensor) -> Tensor:
        return self.lm.get_output_embeddings()(hidden)

    def layers(self) -> list[nn.Module]:
        found = decoder_layers(self.lm.base_model)
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

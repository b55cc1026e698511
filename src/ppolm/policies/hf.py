"""HFPolicy: any `transformers` causal LM behind the Policy interface.

The only module that imports `transformers` model code.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ppolm.errors import CheckpointError
from ppolm.policies.base import Policy, positions_from_mask


class HFPolicy(Policy):
    """Wraps an ``AutoModelForCausalLM`` (an object, or a local folder to load one from).

    The trunk is the model's base model (embeddings and decoder layers, final norm included);
    the head is its output embedding. Position ids follow the attention mask, so left padding
    does not change a sequence's logits.

    Args:
        model: a loaded ``PreTrainedModel`` or the path of a local folder for
            ``AutoModelForCausalLM.from_pretrained``.
        **from_pretrained_kwargs: passed on when ``model`` is a path (e.g. ``gguf_file``).
    """

    def __init__(self, model: Any, **from_pretrained_kwargs: Any) -> None:
        super().__init__()
        if isinstance(model, (str, Path)):
            model = _load(Path(model), from_pretrained_kwargs)
        self.model = model
        self.model.eval()
        cfg = model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            raise CheckpointError(f"{type(model).__name__} rescales its logits after the head; "
                                  "HFPolicy does not support such models yet.")
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0])
        self.hidden_size = int(head.weight.shape[1])
        self.max_length = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None)
        # transformers 5.x renamed `past_key_values` to `cache`; support both.
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def trunk(self, input_ids: Tensor, attention_mask: Tensor, cache: Any = None,
              use_cache: bool = False) -> tuple[Tensor, Any]:
        past = attention_mask.shape[1] - input_ids.shape[1]
        out = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask)[:, past:],
            use_cache=use_cache, **{self._cache_arg: cache})
        return out.last_hidden_state, (out[self._cache_arg] if use_cache else None)

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(hidden)

    def head_params(self) -> tuple[Tensor, Tensor | None] | None:
        if type(self).head is not HFPolicy.head:     # a subclass makes its own logits
            return None
        head = self.model.get_output_embeddings()
        return (head.weight, head.bias) if isinstance(head, nn.Linear) else None

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path))

    def load(self, path: str | Path) -> None:
        self.model.load_state_dict(_load(Path(path), {}).state_dict())


def _load(path: Path, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    if not path.exists():
        raise CheckpointError(f"Model path {str(path)!r} does not exist; give a local folder "
                              "(or file) with a transformers causal LM.")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot load a causal LM from {str(path)!r}: {e}") from None

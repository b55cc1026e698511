"""LoRA through ``peft``: wrapping a causal LM in adapters, the reference as the same model with
its adapters disabled, adapter files, and the merged model for export.

The reference of a LoRA policy needs no copy of the weights: the base model is frozen, so the
policy with its adapters switched off (``PeftModel.disable_adapter()``) *is* the initial
policy. ``AdapterDisabled`` is that view: a Policy that runs the policy's own modules inside
``disable_adapter()`` and owns no parameter. A separate critic needs no copy either:
``AdapterCritic`` adds a second adapter to the same base model and runs the policy's modules
with that adapter active instead of the policy's.

``peft`` is imported only when a LoRA model is built or read (the ``lora`` extra).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from ppolm.config.lora import LORA_KEYS as LORA_KEYS  # re-exported
from ppolm.config.lora import lora_settings
from ppolm.errors import CheckpointError, ConfigError
from ppolm.policies.base import Policy, PolicyOutput

PEFT_INSTALL = 'pip install "ppolm[lora]" (or pip install peft)'


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(f"LoRA needs the peft package: {PEFT_INSTALL}") from None
    return peft


def is_peft(model: Any) -> bool:
    """True when ``model`` is a ``peft.PeftModel`` (without importing peft when it is absent)."""
    return any(c.__module__.startswith("peft.") and c.__name__ == "PeftModel"
               for c in type(model).__mro__)


def unwrap(model: Any) -> Any:
    """The ``transformers`` model under a PeftModel (its layers hold the adapters), or
    ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model


def lora_config(values: dict[str, Any]) -> Any:
    """A ``peft.LoraConfig`` for a causal LM from the YAML mapping ``model.lora`` (see
    ``lora_settings``)."""
    return _peft().LoraConfig(**lora_settings(values), task_type="CAUSAL_LM")


def wrap(model: Any, peft_config: Any) -> Any:
    """``model`` with adapters (``peft.get_peft_model``): its own weights frozen, the adapters
    trainable. A model that already is a PeftModel is refused (pass it without a config)."""
    if is_peft(model):
        raise ConfigError("the model is already a PeftModel: pass it without peft_config.")
    try:
        return _peft().get_peft_model(model, peft_config)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Cannot add LoRA adapters to {type(model).__name__}: {e}") from None


def load_adapters(model: Any, path: str | Path, adapter_name: str = "default") -> None:
    """Load adapter weights written by ``PeftModel.save_pretrained`` into ``model``'s adapter
    ``adapter_name``; refuses files whose adapters do not fit."""
    peft = _peft()
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"No LoRA adapters at {str(folder)!r} (adapter_config.json "
                              "missing).")
    try:
        weights = peft.utils.load_peft_weights(str(folder), device="cpu")
        result = peft.set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"Cannot load the adapters at {str(folder)!r}: {e}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"The adapters at {str(folder)!r} do not fit this model: "
                              f"unexpected {unexpected[:3]}.")


def merged_copy(model: Any) -> Any:
    """A plain ``transformers`` model with the adapters merged into the weights
    (``W + (alpha / r) B A``), made from a copy: the policy keeps its adapters and its base
    weights bit for bit (merging in place and unmerging again would not give them back
    exactly)."""
    return copy.deepcopy(model).merge_and_unload()


@contextlib.contextmanager
def _flags_kept(model: Any) -> Iterator[None]:
    """peft's adapter switches also set ``requires_grad`` of adapter weights: the flags are put
    back as they were, so an adapter the user froze stays frozen."""
    flags = [(p, p.requires_grad) for n, p in model.named_parameters() if "lora_" in n]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _adapter_active(model: Any, name: str) -> Iterator[None]:
    """The adapter ``name`` active in ``model`` inside the context (nothing to do when it is)."""
    active = model.active_adapter
    if active == name:
        yield
        return
    with _flags_kept(model):
        try:
            model.set_adapter(name)
            yield
        finally:
            model.set_adapter(active)


def _recompute_as_forward(model: Any) -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for ``torch.utils.checkpoint``: a layer recomputed in backward runs with
    the adapter that was active in its forward (the critic's, say, switched off since)."""
    def context_fn() -> tuple[Any, Any]:
        return contextlib.nullcontext(), _adapter_active(model, model.active_adapter)
    return context_fn


class _AdapterView(Policy):
    """A LoRA policy's own modules run with its adapters switched (``switched``): a Policy that
    holds the policy without registering it as a submodule, so it owns no parameter: freezing
    it, moving it or its ``state_dict`` leave the policy alone, and the base weights exist once.
    Shapes: as the policy's."""

    policy: Policy

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)      # shared, not owned
        self.vocab_size, self.hidden_size = policy.vocab_size, policy.hidden_size
        self.max_length = policy.max_length

    @property
    def model(self) -> Any:
        """The policy's PeftModel (the same object)."""
        return self.policy.model            # type: ignore[attr-defined]

    def switched(self) -> contextlib.AbstractContextManager[None]:
        """The context in which this view runs the policy's modules (its adapters switched)."""
        raise NotImplementedError

    def _flags_kept(self) -> contextlib.AbstractContextManager[None]:
        return _flags_kept(self.model)

    def trunk(self, input_ids: Tensor, attention_mask: Tensor, cache: Any = None,
              use_cache: bool = False) -> tuple[Tensor, Any]:
        with self.switched():
            return self.policy.trunk(input_ids, attention_mask, cache, use_cache)

    def head(self, hidden: Tensor) -> Tensor:
        with self.switched():
            return self.policy.head(hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int | None = None,
                logits: bool = True) -> PolicyOutput:
        with self.switched():
            out: PolicyOutput = self.policy(input_ids, attention_mask, response_len, logits)
        return out


class AdapterDisabled(_AdapterView):
    """The reference of a LoRA policy: the policy's own modules run with the adapters off.

    It holds the policy without registering it as a submodule, so it owns no parameter:
    freezing it, moving it or its ``state_dict`` leave the policy alone, and the base weights
    exist once. Shapes: as the policy's.
    """

    def __init__(self, policy: Policy) -> None:
        if not is_peft(getattr(policy, "model", None)):
            raise ConfigError(f"{type(policy).__name__} has no LoRA adapters to disable.")
        super().__init__(policy)

    @contextlib.contextmanager
    def switched(self) -> Iterator[None]:
        """The adapters off."""
        with self._flags_kept(), self.model.disable_adapter():
            yield

    def save(self, path: str | Path) -> None:
        raise CheckpointError("The LoRA reference is the base model of the policy: save the "
                              "policy (its adapters) and the base model instead.")

    def load(self, path: str | Path) -> None:
        raise CheckpointError("The LoRA reference has no weights of its own to load.")


CRITIC_ADAPTER = "critic"        # the critic adapter's name in the policy's model


class AdapterCritic(_AdapterView):
    """A separate critic trunk as a second LoRA adapter (``name``) on a LoRA policy's base model
    (added to it; ``existing``: the policy's model has it already).

    The critic runs the policy's own modules with its adapter active instead of the policy's
    (``PeftModel.set_adapter``), so the base weights exist once and the critic trains only its
    adapter (through the value loss; the policy loss never reaches it, nor the value loss the
    policy's adapter). Both adapters start with B = 0, so at the start the critic's states are
    the base model's. Like ``AdapterDisabled`` it holds the policy without owning it: its
    adapter's weights are registered in the policy's model (and so saved with the policy's
    adapters, under ``NAME/``), and ``ValueHead(critic=...)`` owns only the linear head.
    Shapes: as the policy's.
    """

    def __init__(self, policy: Policy, peft_config: Any = None, name: str = CRITIC_ADAPTER,
                 existing: bool = False) -> None:
        model: Any = getattr(policy, "model", None)
        if not is_peft(model):
            raise ConfigError(f"a critic adapter needs a LoRA policy (HFPolicy with "
                              f"peft_config); {type(policy).__name__} has no adapters.")
        if existing:        # the adapter of a checkpoint's model, rebuilt for export
            if name not in model.peft_config:
                raise ConfigError(f"the policy has no adapter named {name!r}.")
        elif name in model.peft_config:
            raise ConfigError(f"the policy already has an adapter named {name!r}.")
        else:
            config = copy.deepcopy(peft_config or model.peft_config[model.active_adapter])
            try:
                model.add_adapter(name, config)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"Cannot add the critic adapter {name!r}: {e}") from None
        super().__init__(policy)
        self.name = name
        for p in self.adapter_parameters():                # peft leaves a new adapter frozen
            p.requires_grad_(True)

    def adapter_parameters(self) -> list[Tensor]:
        """The critic adapter's weights (held by the policy's model)."""
        return [p for n, p in self.model.named_parameters() if f".{self.name}." in n]

    def switched(self) -> contextlib.AbstractContextManager[None]:
        """The critic's adapter active instead of the policy's."""
        return _adapter_active(self.model, self.name)

    def enable_gradient_checkpointing(self) -> list[Any]:
        """Checkpointing in the policy's layers (the same modules; they are the policy's to
        return), each recomputed in backward with the adapter active in its forward: the
        critic's is switched off by the time the value loss's gradients reach its layers."""
        self.policy.enable_gradient_checkpointing()
        kwargs = {"use_reentrant": False, "context_fn": _recompute_as_forward(self.model)}
        if hasattr(self.model, "activation_checkpointing_enable"):   # (transformers >= 5)
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return []

    def save(self, path: str | Path) -> None:
        """The critic adapter alone, as a standard adapter folder (``adapter_config.json`` and
        ``adapter_model.safetensors``): ``PeftModel.from_pretrained(base, path)`` loads it."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        weights = _peft().get_peft_model_state_dict(self.model, adapter_name=self.name)
        save_file({k: v.detach().contiguous() for k, v in weights.items()},
                  str(folder / "adapter_model.safetensors"))
        self.model.peft_config[self.name].save_pretrained(str(folder))

    def load(self, path: str | Path) -> None:
        load_adapters(self.model, path, adapter_name=self.name)

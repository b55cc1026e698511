"""RewardModel: a ``transformers`` trunk with a scalar head, read at each sequence's last
non-padding token; and the model folders it is saved as.

A reward model is what ``AutoModelForSequenceClassification`` with ``num_labels=1`` computes:
the base model's last hidden state at the last real token of each text, times a (1, H) linear
map without bias (``score``). ``RewardModel`` computes exactly that from a causal LM (its trunk
and a new head) or from a sequence-classification model (its trunk and its head), with position
ids that follow the attention mask, so left and right padding give the same scores. It saves
as an ``AutoModelForSequenceClassification`` folder that ``transformers`` (and TRL) load, with
the normalisation of its scores (``NORMALIZATION_FILE``) beside it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ppolm.errors import CheckpointError, ConfigError, DataError
from ppolm.policies.base import positions_from_mask
from ppolm.policies.hf import decoder_layers, final_norm_name, local_model_path
from ppolm.policies.lora import is_peft, merged_copy, wrap

#: The reward normalisation's file in a saved reward-model folder.
NORMALIZATION_FILE = "reward_normalization.json"


@dataclass(frozen=True)
class Normalization:
    """A reward model's scores are used as ``(score - mean) / std``: mean and std of its scores
    on a calibration set of ``count`` texts."""

    mean: float
    std: float
    count: int = 0

    def apply(self, scores: Tensor) -> Tensor:
        """Shapes: (B,) -> (B,)."""
        return (scores - self.mean) / self.std


def write_normalization(folder: str | Path, norm: Normalization) -> Path:
    """Write ``NORMALIZATION_FILE`` into ``folder``."""
    path = Path(folder) / NORMALIZATION_FILE
    path.write_text(json.dumps({"mean": norm.mean, "std": norm.std, "count": norm.count},
                               indent=1) + "\n", encoding="utf-8")
    return path


def read_normalization(folder: str | Path) -> Normalization | None:
    """The normalisation saved in a reward-model folder (None when it has none)."""
    path = Path(folder) / NORMALIZATION_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        norm = Normalization(float(values["mean"]), float(values["std"]),
                             int(values.get("count", 0)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a reward normalisation ({{mean, std}}): "
                              f"{e}") from None
    if not (math.isfinite(norm.mean) and math.isfinite(norm.std) and norm.std > 0):
        raise CheckpointError(f"{str(path)!r}: std must be > 0 and both finite, got {norm}.")
    return norm


class RewardModel(nn.Module):
    """A scalar reward on a ``transformers`` trunk.

    Args:
        model: a causal LM (its trunk gets a new head, weights ~ N(0, initializer_range)), a
            sequence-classification model with ``num_labels=1`` (its trunk and head), an
            ``HFPolicy`` (its causal LM), or the path of a local folder holding either.
        peft_config: LoRA adapters on the trunk (``peft.LoraConfig``); the head trains whole.

    Attributes: ``trunk`` (the base model), ``score`` (``nn.Linear(H, 1, bias=False)``),
    ``config`` (the model's ``transformers`` config).
    """

    def __init__(self, model: Any, peft_config: Any = None) -> None:
        super().__init__()
        if isinstance(model, (str, Path)):
            model = _load(local_model_path(model))
        model = getattr(model, "lm", model)             # an HFPolicy: its transformers model
        self.config = copy.deepcopy(model.config)
        head = getattr(model, "score", None) if _is_classifier(model) else None
        labels = int(getattr(self.config, "num_labels", 1)) if head is not None else 1
        if labels != 1:
            raise ConfigError(f"{type(model).__name__} has num_labels={labels}; a reward model "
                              "gives one score per text: load it with num_labels=1.")
        trunk = model.base_model
        hidden = int(trunk.get_input_embeddings().weight.shape[1])
        if head is None:
            head = nn.Linear(hidden, 1, bias=False)
            std = float(getattr(self.config, "initializer_range", 0.02))
            nn.init.normal_(head.weight, std=std)
            head.to(device=trunk.get_input_embeddings().weight.device,
                    dtype=trunk.get_input_embeddings().weight.dtype)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ConfigError(f"the head of {type(model).__name__} is {head!r}, not a linear "
                              "map to one score.")
        self.trunk = wrap(trunk, peft_config) if peft_config is not None else trunk
        self.score = head
        self.hidden_size = hidden

    @property
    def vocab_size(self) -> int:
        """Rows of the input embeddings: the token ids the model can read."""
        return int(self.base_trunk.get_input_embeddings().weight.shape[0])

    @property
    def base_trunk(self) -> Any:
        """The ``transformers`` base model (under the PeftModel with LoRA)."""
        return self.trunk.get_base_model() if is_peft(self.trunk) else self.trunk

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor | None = None, read_at: Tensor | None = None) -> Tensor:
        """The score of each sequence, at its last non-padding token, in float32.

        Shapes: input_ids, attention_mask (B, L) -> (B,). Packed rows
        (``ppolm.reward_modeling.packing``): attention_mask (B, 1, L, L) additive, with
        ``position_ids`` (B, L) and ``read_at`` (K, 2), the (row, column) of each token to
        score -> (K,)."""
        packed = attention_mask.dim() == 4
        if input_ids.dim() != 2 or (not packed and input_ids.shape != attention_mask.shape):
            raise DataError(f"input_ids and attention_mask must both be (B, L), got "
                            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}.")
        if packed and (position_ids is None or read_at is None):
            raise DataError("a 4-D (packed) attention_mask needs position_ids and read_at.")
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids if packed else
                         positions_from_mask(attention_mask), use_cache=False)
        hidden = out.last_hidden_state                                        # (B, L, H)
        if packed:
            assert read_at is not None
            pooled = hidden[read_at[:, 0], read_at[:, 1]]                     # (K, H)
        else:
            L = attention_mask.shape[1]
            last = (attention_mask.long() * torch.arange(L, device=hidden.device)).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # a tensor of its own, not a view: FSDP2 hooks a wrapped module's outputs and an
        # in-place op on a view would skip the hook (it warns)
        return self.score(pooled).squeeze(-1).float().clone()

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating dtype (that of a packed batch's attention mask)."""
        return self.score.weight.dtype

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer whose ids do not fit the model's embeddings."""
        if len(tokenizer) > self.vocab_size:
            raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the model's "
                            f"embeddings only {self.vocab_size}: it is not this model's "
                            "tokenizer (or its embeddings need resizing).")

    def layers(self) -> list[nn.Module]:
        """The trunk's decoder layers (what FSDP2 shards one by one; empty when not found)."""
        found = decoder_layers(self.base_trunk)
        return list(found[1]) if found is not None else []

    def train_top_layers(self, n: int) -> None:
        """Train only the top ``n`` decoder layers, the final norm and the head."""
        base = self.base_trunk
        found = decoder_layers(base)
        if found is None or not 0 < n <= len(found[1]):
            count = len(found[1]) if found else 0
            raise ConfigError(f"trainable_layers={n} must be in 1..{count} (the model's "
                              "decoder layers).")
        self.trunk.requires_grad_(False)
        for layer in found[1][len(found[1]) - n:]:
            layer.requires_grad_(True)
        norm = final_norm_name(base)
        if norm is not None:
            getattr(base, norm).requires_grad_(True)
        self.score.requires_grad_(True)

    def to_transformers(self, pad_token_id: int, state: dict[str, Tensor] | None = None
                        ) -> Any:
        """A new ``AutoModelForSequenceClassification`` (num_labels=1, ``pad_token_id`` set)
        holding these weights (LoRA merged), on the CPU; or the weights of ``state``, this
        model's whole ``state_dict()`` gathered from elsewhere (FSDP2's shards; no LoRA)."""
        from transformers import AutoModelForSequenceClassification

        cfg = copy.deepcopy(self.config)
        cfg.num_labels, cfg.pad_token_id, cfg.architectures = 1, pad_token_id, None
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        text.pad_token_id = pad_token_id
        if state is None:
            trunk = merged_copy(self.trunk) if is_peft(self.trunk) else self.trunk
            state = {**{f"trunk.{k}": v for k, v in trunk.state_dict().items()},
                     "score.weight": self.score.weight}
        head = state["score.weight"]
        out = AutoModelForSequenceClassification.from_config(cfg, dtype=head.dtype)
        base = getattr(out, out.base_model_prefix)
        missing, unexpected = base.load_state_dict(
            {k.removeprefix("trunk."): v.detach().cpu() for k, v in state.items()
             if k.startswith("trunk.")}, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise CheckpointError(f"the trunk does not fit {type(out).__name__}: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}.")
        with torch.no_grad():
            out.score.weight.copy_(head.detach().cpu())
        return out.eval()

    def save_pretrained(self, path: str | Path, tokenizer: Any,
                        normalization: Normalization | None = None,
                        state: dict[str, Tensor] | None = None) -> Path:
        """Write an ``AutoModelForSequenceClassification`` folder (num_labels=1, pad_token_id
        set), the tokenizer, and ``normalization`` (``NORMALIZATION_FILE``) when given;
        ``state``: the weights to write instead of this model's (see ``to_transformers``)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        pad = pad_token_id(tokenizer)
        self.to_transformers(pad, state).save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        if normalization is not None:
            write_normalization(folder, normalization)
        return folder


def pad_right(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[Tensor, Tensor]:
    """Token id lists padded on the right. Shapes: -> input_ids, attention_mask (N, L)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_rows(model: RewardModel, rows: list[list[int]], batch_size: int, pad_id: int,
               device: torch.device | str = "cpu") -> Tensor:
    """The score of each token id list, in batches. Shapes: -> (N,) float32 on the CPU."""
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_right(rows[start: start + batch_size], pad_id, device)
        out.append(model(ids, mask).float().cpu())
    return torch.cat(out)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (its end token's when it has no padding token, as TRL)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a padding nor an end token: set "
                        "tokenizer.pad_token.")
    return int(pad)


def load_reward_model(path: str | Path) -> tuple[RewardModel, Any, Normalization | None]:
    """A saved reward-model folder: the model (eval mode), its tokenizer and its normalisation
    (None when the folder has no ``NORMALIZATION_FILE``)."""
    from transformers import AutoTokenizer

    folder = local_model_path(path)
    model = RewardModel(folder).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot load a tokenizer from {str(folder)!r}: {e}") from None
    model.check_tokenizer(tokenizer)
    return model, tokenizer, read_normalization(folder)


def _is_classifier(model: Any) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _load(folder: Path) -> Any:
    """A folder's sequence-classification model when its config says it is one, else its
    causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if not folder.exists():
        raise CheckpointError(f"Model path {str(folder)!r} does not exist.")
    try:
        cfg = AutoConfig.from_pretrained(str(folder))
        classifier = any(a.endswith("ForSequenceClassification")
                         for a in (getattr(cfg, "architectures", None) or []))
        cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        return cls.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot load a model from {str(folder)!r}: {e}") from None


def start_critic(critic: Any, linear: nn.Linear, path: str | Path) -> None:
    """Start a separate critic from a saved reward model (InstructGPT and OpenRLHF initialise
    the critic so): ``critic`` (an ``HFPolicy`` of the same architecture) gets the reward
    model's trunk, and the value head ``linear`` its score head, divided by the normalisation's
    std with bias ``-mean / std`` (when the folder has one), so the first values are on the
    scale of the normalised reward."""
    model, _, norm = load_reward_model(path)
    lm = getattr(critic, "lm", None)
    if lm is None or getattr(critic, "is_lora", False):
        raise ConfigError(f"from_reward_model needs a transformers policy without LoRA (an "
                          f"HFPolicy), not {type(critic).__name__}.")
    ours, theirs = lm.base_model.state_dict(), model.base_trunk.state_dict()
    unfit = [k for k in theirs if k not in ours or ours[k].shape != theirs[k].shape]
    if unfit or len(ours) != len(theirs):
        raise ConfigError(f"the reward model at {str(path)!r} does not have the policy's "
                          f"architecture (e.g. {unfit[:2] or sorted(set(ours) - set(theirs))[:2]}"
                          "): train the reward model from the policy's base model.")
    lm.base_model.load_state_dict(theirs)
    scale, shift = (1.0, 0.0) if norm is None else (1.0 / norm.std, -norm.mean / norm.std)
    with torch.no_grad():
        linear.weight.copy_(model.score.weight.detach().to(linear.weight.dtype) * scale)
        if linear.bias is not None:
            linear.bias.fill_(shift)

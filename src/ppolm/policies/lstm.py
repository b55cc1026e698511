"""The design ppolm started from: embedding -> LSTM -> linear (-> softmax)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ppolm.errors import ConfigError
from ppolm.policies.base import TorchPolicy

LSTMState = tuple[Tensor, Tensor]   # h, c: (n_layers, B, H) each


class LSTMPolicy(TorchPolicy):
    """Embedding -> multi-layer LSTM -> linear head.

    Padding never enters the recurrence: a row's real tokens (contiguous, after left padding)
    are shifted to the front and packed, so its hidden states do not depend on how much padding
    it carries or on the other rows of the batch.

    Args:
        vocab_size: number of token ids (``len(tokenizer)``).
        hidden_size: LSTM width.
        n_layers: stacked LSTM layers.
        embed_size: embedding width (defaults to hidden_size).
        dropout: dropout between LSTM layers (off in eval mode, which PPO uses).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 128, n_layers: int = 1,
                 embed_size: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if vocab_size <= 0 or hidden_size <= 0 or n_layers <= 0:
            raise ConfigError("vocab_size, hidden_size and n_layers must be > 0.")
        embed_size = embed_size or hidden_size
        self.vocab_size, self.hidden_size, self.max_length = vocab_size, hidden_size, None
        self.arch = dict(vocab_size=vocab_size, hidden_size=hidden_size, n_layers=n_layers,
                         embed_size=embed_size, dropout=dropout)
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, n_layers, batch_first=True,
                            dropout=dropout if n_layers > 1 else 0.0)
        self.lm_head = nn.Linear(hidden_size, vocab_size)

    def trunk(self, input_ids: Tensor, attention_mask: Tensor, cache: LSTMState | None = None,
              use_cache: bool = False) -> tuple[Tensor, LSTMState | None]:
        Lq = input_ids.shape[1]
        mask = attention_mask[:, -Lq:].bool()                               # (B, Lq)
        x = self.embed(input_ids)                                           # (B, Lq, E)
        if cache is None and _contiguous(mask):
            hidden, state = self._packed(x, mask)
        else:
            hidden, state = self._stepwise(x, mask, cache)
        return hidden, (state if use_cache else None)

    def _packed(self, x: Tensor, mask: Tensor) -> tuple[Tensor, LSTMState]:
        B, L, _ = x.shape
        start = (mask.long().cumsum(1) == 0).sum(1)                         # (B,) left pads
        lengths = mask.sum(1).clamp(min=1)                                  # (B,)
        ar = torch.arange(L, device=x.device)
        fwd = (ar[None, :] + start[:, None]).clamp(max=L - 1)               # (B, L)
        shifted = x.gather(1, fwd[..., None].expand_as(x))                  # real tokens first
        packed = pack_padded_sequence(shifted, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, state = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, H)
        back = (ar[None, :] - start[:, None]).clamp(min=0)                  # undo the shift
        hidden = out.gather(1, back[..., None].expand(B, L, out.shape[-1]))
        return hidden * mask[..., None], state

    def _stepwise(self, x: Tensor, mask: Tensor, state: LSTMState | None
                  ) -> tuple[Tensor, LSTMState]:
        """One token at a time; a padded step leaves the state unchanged."""
        B, L, _ = x.shape
        if state is None:
            zeros = x.new_zeros(self.lstm.num_layers, B, self.hidden_size)
            state = (zeros, zeros)
        outs = []
        for t in range(L):
            out, (h, c) = self.lstm(x[:, t: t + 1], state)
            keep = mask[:, t][None, :, None]                                # (1, B, 1)
            state = (torch.where(keep, h, state[0]), torch.where(keep, c, state[1]))
            outs.append(out[:, 0] * mask[:, t, None])
        return torch.stack(outs, 1), state

    def head(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def select_cache(self, cache: LSTMState, rows: Tensor) -> LSTMState:
        return cache[0][:, rows], cache[1][:, rows]


def _contiguous(mask: Tensor) -> bool:
    """True when each row's real tokens form one contiguous run."""
    csum = mask.long().cumsum(1)
    first = (csum == 0).sum(1)
    return bool(((csum[:, -1] + first) == (mask.long() * torch.arange(
        1, mask.shape[1] + 1, device=mask.device)).amax(1)).all())

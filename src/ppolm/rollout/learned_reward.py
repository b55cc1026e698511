"""A learned reward model as PPO's reward: a folder written by ``RewardModelTrainer.save_model``
(or ``ppolm train-rm``) scores ``prompt + response`` as it was trained, normalised by default
with the folder's ``reward_normalization.json``.

Texts are tokenized as in training: a string with the tokenizer's special tokens; a prompt
given as chat messages (``prompt_messages``) goes with the response through the chat template,
as a conversational pair did. A text longer than ``max_length`` keeps its last tokens (the
score is read at the last one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ppolm.errors import RewardError
from ppolm.policies.reward_model import load_reward_model, pad_token_id, score_rows
from ppolm.rollout.rewards import RewardFunction


class RewardModelReward(RewardFunction):
    """Scores from a saved reward model.

    Args:
        model: the reward-model folder.
        normalize: use ``(score - mean) / std`` with the folder's normalisation (default);
            False: the raw scores.
        include_prompt: score ``prompt + response`` (default) or the response alone.
        batch_size: texts per forward pass.
        max_length: tokens kept of each text (its last ones).
        device: where the model runs (default the CPU).
    """

    def __init__(self, model: str | Path, normalize: bool = True, include_prompt: bool = True,
                 batch_size: int = 32, max_length: int = 1024, device: str = "cpu") -> None:
        self.model, self.tokenizer, norm = load_reward_model(model)
        if normalize and norm is None:
            raise RewardError(f"reward model {str(model)!r} has no reward_normalization.json; "
                              "save it with RewardModelTrainer.save_model, or use "
                              "normalize=False for raw scores.")
        self.normalization = norm if normalize else None
        self.model.to(device)
        self.device = torch.device(device)
        self.include_prompt, self.batch_size, self.max_length = (include_prompt, batch_size,
                                                                 max_length)
        self.pad_id = pad_token_id(self.tokenizer)

    def token_ids(self, prompts: list[str], responses: list[str],
                  prompt_messages: list[Any] | None = None) -> list[list[int]]:
        """Each text's token ids, as the reward model was trained on them."""
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            messages = prompt_messages[i] if prompt_messages else None
            if messages is not None and self.include_prompt:
                text = self.tokenizer.apply_chat_template(
                    [*messages, {"role": "assistant", "content": r}], tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(p + r if self.include_prompt else r)["input_ids"]
            out.append(ids[-self.max_length:] or [self.pad_id])
        return out

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str],
                 prompt_messages: list[Any] | None = None, **columns: list[Any]) -> list[float]:
        rows = self.token_ids(prompts, responses, prompt_messages)
        scores = score_rows(self.model, rows, self.batch_size, self.pad_id, self.device)
        if self.normalization is not None:
            scores = self.normalization.apply(scores.double()).float()
        return [float(s) for s in scores]

"""ValueHead: V(s) as its own module, on the policy's trunk or on a separate critic trunk."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ppolm.policies.base import Policy


class ValueHead(nn.Module):
    """A linear value head.

    Three set-ups:
      * ``ValueHead(policy.hidden_size)``: on the policy's hidden states (shared trunk, one
        forward pass for policy and value; the value loss also trains the trunk);
      * ``ValueHead(policy.hidden_size, detach=True)``: shared trunk, but the value loss does not
        reach it;
      * ``ValueHead.separate(policy)``: on its own critic trunk (a copy of the policy), held as
        ``critic``; the Trainer's engine runs that trunk and hands its states to ``forward``;
      * ``ValueHead.adapter(policy)``: for a LoRA policy, the critic trunk is a second adapter
        on the policy's base model (``ppolm.policies.lora.AdapterCritic``: no copy).

    The head starts at zero output (weights ~ N(0, init_std), bias 0) so early value errors do
    not swamp the policy gradient through a shared trunk.
    """

    def __init__(self, hidden_size: int, critic: Policy | None = None, detach: bool = False,
                 init_std: float = 1e-3) -> None:
        super().__init__()
        self.critic = critic
        self.detach = detach
        self.linear = nn.Linear(critic.hidden_size if critic is not None else hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def separate(cls, policy: Policy, init_std: float = 1e-3,
                 from_reward_model: str | Path | None = None) -> ValueHead:
        """A value head on a separate critic trunk, initialised as a copy of ``policy``; with
        ``from_reward_model`` (a folder saved by ``RewardModelTrainer.save_model``), the
        critic's trunk and the head start from the reward model's (see
        ``ppolm.policies.reward_model.start_critic``)."""
        head = cls(policy.hidden_size, critic=copy.deepcopy(policy), init_std=init_std)
        if from_reward_model is not None:
            from ppolm.policies.reward_model import start_critic

            start_critic(head.critic, head.linear, from_reward_model)
        return head

    @classmethod
    def adapter(cls, policy: Policy, peft_config: object = None, init_std: float = 1e-3
                ) -> ValueHead:
        """A value head on a critic that is a second LoRA adapter (``peft_config``, default the
        policy's) on a LoRA policy's base model: a separate critic without a copy of the
        weights."""
        from ppolm.policies.lora import AdapterCritic

        return cls(policy.hidden_size, critic=AdapterCritic(policy, peft_config),
                   init_std=init_std)

    @property
    def shared(self) -> bool:
        """True when the head reads the policy's hidden states."""
        return self.critic is None

    def forward(self, hidden: Tensor) -> Tensor:
        """Values of the states ``hidden`` (the policy's, or the critic trunk's), in float32.

        Shapes: (B, T, H) -> (B, T)."""
        if self.detach:
            hidden = hidden.detach()
        device = hidden.device.type
        # float32 under autocast too: GAE and the value loss read these values.
        with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") and \
                torch.is_autocast_enabled(device) else contextlib.nullcontext():
            # The linear map over (B*T, H) rows: its output is then a tensor of its own, not
            # a view (a linear over (B, T, H) returns a view of its flat result), which FSDP2,
            # when it wraps the linear, needs to hook it safely (it warns otherwise).
            B, T, H = hidden.shape
            out: Tensor = self.linear(hidden.float().reshape(B * T, H))      # (B*T, 1)
        return out.view(B, T)

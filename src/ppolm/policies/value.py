"""ValueHead: V(s) as its own module, on the policy's trunk or on a separate critic trunk."""

from __future__ import annotations

import copy

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
      * ``ValueHead.separate(policy)``: on its own critic trunk (a copy of the policy).

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
    def separate(cls, policy: Policy, init_std: float = 1e-3) -> ValueHead:
        """A value head on a separate critic trunk, initialised as a copy of ``policy``."""
        return cls(policy.hidden_size, critic=copy.deepcopy(policy), init_std=init_std)

    @property
    def shared(self) -> bool:
        """True when the head reads the policy's hidden states."""
        return self.critic is None

    def forward(self, policy_hidden: Tensor | None, input_ids: Tensor, attention_mask: Tensor,
                response_len: int) -> Tensor:
        """Values of the states that predict the last ``response_len`` tokens.

        Shapes: policy_hidden (B, T, H) (the policy's states at those positions; ignored with a
        critic trunk), input_ids and attention_mask (B, L); returns (B, T).
        """
        if self.critic is not None:
            L = input_ids.shape[1]
            hidden, _ = self.critic.trunk(input_ids, attention_mask)
            hidden = hidden[:, L - response_len - 1: L - 1]
        else:
            assert policy_hidden is not None, "a shared value head needs the policy's hidden states"
            hidden = policy_hidden.detach() if self.detach else policy_hidden
        # The values in float32 under autocast too (GAE and the value loss read them).
        if hidden.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(
                hidden.device.type):
            with torch.autocast(hidden.device.type, enabled=False):
                return self.linear(hidden.float()).squeeze(-1)
        return self.linear(hidden.float()).squeeze(-1)

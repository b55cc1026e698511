"""KL coefficient controllers: fixed, or adaptive toward a target (Ziegler et al. 2019)."""

from __future__ import annotations

from typing import Any


class KLController:
    """Holds beta, the KL coefficient. With ``adaptive=True``, after each batch:

        beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n / horizon)

    where KL is the batch's mean KL per response and n its number of episodes.
    """

    def __init__(self, kl_coef: float, adaptive: bool = False, target: float = 6.0,
                 horizon: int = 10000) -> None:
        self.value, self.adaptive, self.target, self.horizon = kl_coef, adaptive, target, horizon

    def update(self, kl: float, n: int) -> None:
        if not self.adaptive:
            return
        error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

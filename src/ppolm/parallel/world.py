"""Several processes (``torchrun``): the process group, and the few collective steps that make N
ranks on shares of a batch compute what one process computes on the whole batch.

Each rank samples ``batch_size / world_size`` episodes from its own share of the prompts. The
rollouts are gathered (small (B, T) tensors, not the models' states) so that every rank computes
the advantages, the reward and advantage whitening and the logged statistics of the WHOLE batch,
exactly as one process would, then keeps its own rows for the update. The update's losses are
normalised by the global token counts (``World.sum``), so the gradients the engine's DDP or
FSDP2 reduce add up to those of one process on the whole batch.

Under torchrun a process group is started at any world size, one rank included, so that
``torchrun --nproc-per-node 1`` runs the same DDP or FSDP2 code as N ranks (FSDP2's mixed
precision on one GPU, say). In one process started without a launcher (no process group)
``World`` is trivial: every method returns its input, and nothing here is ever called on a
process group.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

import ppolm.errors as errors
from ppolm.config.ppo import PPOConfig
from ppolm.errors import ConfigError, PPOLMError
from ppolm.rollout.types import Advantages, Rollout

T = TypeVar("T")


def launched() -> bool:
    """Whether a launcher (torchrun, or SLURM's srun with the same variables set) started this
    process as a rank of a process group, of any size, one included: it sets RANK, WORLD_SIZE
    and the rendezvous address MASTER_ADDR."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Start the default process group when a launcher started this process (``launched``,
    one rank included) and none is running yet: NCCL on CUDA, gloo on CPU; torn down when the
    process exits. Collectives wait at most ``timeout_s`` for a rank that stopped answering,
    then raise instead of hanging."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        # Wrappers left in reference cycles (DDP's reducer) go first: destroyed after their
        # process group, they abort the interpreter's exit.
        gc.collect()
        dist.destroy_process_group()


@dataclass(frozen=True)
class World:
    """The processes of a run: this one's ``rank`` among ``size``; ``grouped`` when they form a
    process group (under torchrun, one rank included)."""

    rank: int = 0
    size: int = 1
    grouped: bool = False

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), grouped=True)
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, shows progress and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the run goes through a process group (sharded rollouts, collectives, DCP
        checkpoints), one rank under torchrun included."""
        return self.grouped or self.size > 1

    def check_config(self, config: PPOConfig) -> None:
        """Refuse settings that do not split over the ranks: a batch that is not equal
        whole-group shares."""
        if not self.distributed:
            return
        k, batch, mini = config.samples_per_prompt, config.batch_size, config.minibatch_size
        if batch % (self.size * k) or mini % self.size:
            raise ConfigError(
                f"batch_size={batch} and minibatch_size={mini} are global sizes split over "
                f"{self.size} ranks: batch_size must be a multiple of world size x "
                f"samples_per_prompt ({self.size} x {k}) and minibatch_size a multiple of "
                f"{self.size}.")

    # --- prompts ---------------------------------------------------------------------------
    def share(self, items: list[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (whose length the size divides)."""
        n = len(items) // self.size
        return items[self.rank * n: (self.rank + 1) * n]

    # --- reductions ------------------------------------------------------------------------
    def sum(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the ranks (a new tensor; ``x`` itself in one process)."""
        if not self.distributed:
            return x
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    def reduce_stats(self, totals: dict[str, float], maxed: tuple[str, ...] = ()
                     ) -> dict[str, float]:
        """Statistics summed over the ranks (each rank's value already a share of the global
        one), the names in ``maxed`` the maximum over the ranks."""
        if not self.distributed or not totals:
            return totals
        keys = sorted(totals)
        summed = torch.tensor([0.0 if k in maxed else totals[k] for k in keys],
                              dtype=torch.float64)
        peak = torch.tensor([totals[k] if k in maxed else -torch.inf for k in keys],
                            dtype=torch.float64)
        dist.all_reduce(summed)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {k: float(peak[i] if k in maxed else summed[i]) for i, k in enumerate(keys)}

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on any rank (every rank gets the same answer)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def together(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; when it raises on any rank, raise on EVERY rank (the same
        ppolm error class, naming the rank and its message) rather than leave the others
        waiting in their next collective."""
        if not self.distributed:
            return fn()
        err: BaseException | None = None
        out: Any = None
        try:
            out = fn()
        except Exception as e:   # shared below, then re-raised here
            err = e
        found: list[Any] = [None] * self.size
        mine = None if err is None else (type(err).__name__, str(err))
        dist.all_gather_object(found, mine)
        if err is not None:
            raise err
        for rank, failure in enumerate(found):
            if failure is not None:
                name, message = failure
                cls = getattr(errors, name, None)
                if not (isinstance(cls, type) and issubclass(cls, PPOLMError)):
                    cls = errors.TrainingError
                raise cls(f"{what} failed on rank {rank}: {message}")
        return out  # type: ignore[no-any-return]

    def on_main(self, fn: Callable[[], None], what: str) -> None:
        """Run ``fn`` on rank 0 alone (writing a file the ranks share), the others waiting for
        it; when it raises, raise on every rank (as ``together``)."""
        self.together(lambda: fn() if self.is_main else None, what)

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for in one process)."""
        if self.distributed:
            dist.barrier()

    # --- the whole batch ---------------------------------------------------------------------
    def gather_rollout(self, rollout: Rollout) -> Rollout:
        """Every rank's rollout, rank after rank, as one Rollout of the whole batch: prompts
        left-padded and responses right-padded to the widest rank's (padding masked out).
        ``ref_dist`` is left out (the advantages and statistics do not read it)."""
        if not self.distributed:
            return rollout
        T = rollout.response_mask.shape[1]
        P = rollout.input_ids.shape[1] - T
        widths = torch.tensor([P, T])
        dist.all_reduce(widths, op=dist.ReduceOp.MAX)
        P_all, T_all = int(widths[0]), int(widths[1])

        def pad_response(x: Tensor) -> Tensor:          # (B, T, ...) -> (B, T_all, ...)
            return F.pad(x, (0, 0) * (x.dim() - 2) + (0, T_all - T))

        def pad_sequence(x: Tensor) -> Tensor:          # (B, P + T) -> (B, P_all + T_all)
            return F.pad(x, (P_all - P, T_all - T))

        padded: dict[str, Tensor] = {}
        for f in fields(rollout):
            x = getattr(rollout, f.name)
            if x is None or f.name == "ref_dist":
                continue
            if f.name in ("input_ids", "attention_mask"):
                x = pad_sequence(x)
            elif x.dim() >= 2:
                x = pad_response(x)
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous())
            padded[f.name] = torch.cat(parts)
        return replace(rollout, ref_dist=None, **padded)

    def own_rows(self, advantages: Advantages, rollout: Rollout) -> Advantages:
        """This rank's rows of the whole batch's advantages, cut to its own ``rollout``'s
        response width."""
        if not self.distributed:
            return advantages
        B, T = rollout.response_mask.shape
        rows = slice(self.rank * B, (self.rank + 1) * B)
        return Advantages(advantages.rewards[rows, :T], advantages.advantages[rows, :T],
                          advantages.returns[rows, :T])

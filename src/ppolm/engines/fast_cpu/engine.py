"""FastCPUEngine: the single-process CPU engine. Every technique is described, with its measured
gain and the test that proves it gives the plain engine's numbers, in docs/performance.md."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ppolm.config.sections import FastCPUSettings
from ppolm.engines.base import (
    Engine,
    OptimizerSettings,
    ResponseForward,
    Sequences,
    StepResult,
    trainable_parameters,
    trained_modules,
)
from ppolm.engines.fast_cpu.attention import cpu_bf16_autocast, cpu_bf16_supported
from ppolm.engines.fast_cpu.clipping import clip_factor, grad_norm, step_with_factor
from ppolm.engines.fast_cpu.decoding import StaticDecoder, decodes_like, supported
from ppolm.engines.fast_cpu.forward import OnEmbeds, forward_response, trunk_hidden
from ppolm.engines.fast_cpu.frozen import BottomRecorder, frozen_split
from ppolm.engines.fast_cpu.grad_buffers import GradBuffers
from ppolm.engines.fast_cpu.memory import keep_freed_memory
from ppolm.engines.fast_cpu.optim import AdamW
from ppolm.engines.fast_cpu.views import FastView, HFView, view_of
from ppolm.errors import ConfigError
from ppolm.policies.base import Policy, response_slice
from ppolm.policies.value import ValueHead
from ppolm.rollout.sampling import StepTrunk


class FastCPUEngine(Engine):
    """Persistent gradient buffers, AdamW over the touched rows of token tables, clipping
    inside the fused step, the fused LM head, frozen lower layers run once per rollout, and
    (opt-in) bf16 autocast, ``torch.compile`` of the trunks and malloc keeping freed memory.
    One process, CPU only; models are used as they are given (no DDP/FSDP/PEFT wrappers).

    What it needs of a model beyond the Policy contract (a linear head, the trunk from input
    embeddings, the frozen-layer split) it asks of the model's view (``views.view_of``), kept
    in ``views`` for the engine's life; a policy kind without a view of its own runs with the
    generic one."""

    name = "fast_cpu"

    def __init__(self, settings: FastCPUSettings | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.settings = settings or FastCPUSettings()
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ConfigError(f"engine='fast_cpu' runs on CPU only (device is {self.device}); "
                              "use engine='plain' (or 'auto').")
        if self.settings.cpu_bf16 and not cpu_bf16_supported():
            raise ConfigError("cpu_bf16=True, but PyTorch reports no bf16 support for this CPU "
                              "(it needs AVX-512 BF16 or AMX); leave cpu_bf16 off (float32).")
        self.max_grad_norm: float | None = None
        self.depth, self.ref_shares_bottom = 0, False
        self.on_embeds: OnEmbeds | None = None
        self.views: dict[Policy, FastView] = {}
        self._decodes: dict[Policy, bool] = {}      # static_decoding's probe, per policy
        self._recorder: BottomRecorder | None = None
        self._bottom: Tensor | None = None          # (B, L, H) of the last batch seen whole
        self._bottom_of: Tensor | None = None       # that batch's input_ids

    def setup(self, policy: Policy, value_head: ValueHead | None, reference: Policy,
              optim: OptimizerSettings) -> None:
        s = self.settings
        self.critic = value_head.critic if value_head is not None else None
        self.policy, self.reference = policy, reference
        views = [self.view(m) for m in (policy, reference, self.critic) if m is not None]
        if s.compile:
            check_compile(*views)
            self.on_embeds = torch.compile(trunk_on_embeds)
        kept = s.keep_freed_memory and keep_freed_memory()
        head = self.view(policy).head_params()
        modules = [m for m in (policy, value_head) if m is not None]
        self.buffers = GradBuffers(*modules, heads=[head[0]] if head else [],
                                   linears=not kept and not s.compile)
        self.trained = trained_modules(policy, value_head)
        self.params = trainable_parameters(policy, value_head)
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = AdamW(self.params, lr=optim.learning_rate, eps=optim.adam_eps,
                               weight_decay=optim.weight_decay, fused=True,
                               row_tables=self.buffers.row_tables, rows=self.buffers.rows)
        self.depth, self.ref_shares_bottom = frozen_split(
            self.view(policy), self.view(reference), self.device, s.reuse_frozen_layers)

    def view(self, model: Policy) -> FastView:
        """The engine's view of ``model``: made once per model (it keeps modules a compiled
        graph is guarded on), from ``views.view_of`` unless one is in ``views`` already."""
        if model not in self.views:
            self.views[model] = view_of(model)
        return self.views[model]

    @property
    def kept_bottom(self) -> Tensor | None:
        """The frozen layers' output for the current rollout's whole batch, kept for its other
        passes (None before one, or without a split). Shapes: (B, L, H)."""
        return self._bottom

    # --- contexts ------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.settings.cpu_bf16:
            return contextlib.nullcontext()
        return cpu_bf16_autocast()

    @contextlib.contextmanager
    def rollout(self) -> Iterator[None]:
        self._recorder, self._bottom, self._bottom_of = None, None, None
        with self.autocast(), self.casts_cached(self.policy):
            yield
        self._recorder = None

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        try:
            with self.buffers.active():
                yield
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.buffers.release()

    def sampling_trunk(self, policy: Policy) -> StepTrunk | None:
        view = self.view(policy)
        depth = self.depth if (self.depth and policy is self.policy
                               and view.records_bottom) else 0
        trunk: BottomRecorder | None = None
        if self.static_decodes(policy):
            assert isinstance(view, HFView)
            trunk = StaticDecoder(view, depth, pack=self.settings.packed_weights,
                                  prefill_once=self.settings.prefill_once)
        elif depth:
            trunk = BottomRecorder(view, depth)
        if depth:
            self._recorder = trunk
        return trunk

    def static_decodes(self, policy: Policy) -> bool:
        """Whether ``policy``'s decoding steps run over a preallocated cache
        (``static_decoding``): a model family ``decoding`` runs, checked once on a probe."""
        if policy not in self._decodes:
            view = self.view(policy)
            self._decodes[policy] = bool(self.settings.static_decoding and supported(view)
                                         and decodes_like(view, self.device,
                                                          self.settings.packed_weights))
        return self._decodes[policy]

    # --- forward passes ------------------------------------------------------------------------
    def forward_response(self, model: Policy, seqs: Sequences, temperature: float, *,
                         entropy_grad: bool = False, full_dist: bool = False
                         ) -> ResponseForward:
        bottom = self._bottom_for(model, seqs)
        with self.autocast():
            return forward_response(self.view(model), seqs.input_ids, seqs.attention_mask,
                                    seqs.response_len, temperature, entropy_grad=entropy_grad,
                                    full_dist=full_dist, bottom=bottom, depth=self.depth,
                                    on_embeds=self.on_embeds)

    def forward_hidden(self, model: Policy, seqs: Sequences) -> Tensor:
        with self.autocast():
            hidden = trunk_hidden(self.view(model), seqs.input_ids, seqs.attention_mask,
                                  on_embeds=self.on_embeds)
        return response_slice(hidden, seqs.response_len)

    def _bottom_for(self, model: Policy, seqs: Sequences) -> Tensor | None:
        """The frozen layers' output for ``seqs`` when ``model`` can start above them: rows of
        the last whole batch (``seqs.index``), or that batch itself, or computed now (from the
        sampler's recorder when it has it) and kept for the batch's other passes."""
        uses = self.depth and (model is self.policy or
                               (model is self.reference and self.ref_shares_bottom))
        if not uses:
            return None
        L = seqs.input_ids.shape[1]
        if seqs.index is not None:
            kept = self._bottom
            if kept is not None and kept.shape[1] == L and int(seqs.index.max()) < kept.shape[0]:
                return kept[seqs.index]
        elif seqs.input_ids is self._bottom_of:
            return self._bottom
        with torch.no_grad(), self.autocast():
            bottom = self._recorder.bottom(L) if self._recorder is not None else None
            self._recorder = None
            if bottom is None or bottom.shape[0] != seqs.input_ids.shape[0]:
                bottom = self.view(self.policy).trunk_bottom(
                    seqs.input_ids, seqs.attention_mask, self.depth)           # (B, L, H)
        if seqs.index is None:
            self._bottom, self._bottom_of = bottom, seqs.input_ids
        return bottom

    @contextlib.contextmanager
    def casts_cached(self, module: torch.nn.Module) -> Iterator[None]:
        """Under CPU autocast without gradient, the bf16 casts of ``module``'s frozen weights
        kept for the whole block: autocast keeps a cast only for weights that require grad,
        and would cast a frozen one again at every decoding step. Marking them for the block
        (which runs without gradient) changes nothing else."""
        frozen = ([p for p in module.parameters() if not p.requires_grad and p.is_floating_point()]
                  if self.settings.cpu_bf16 and not torch.is_grad_enabled() else [])
        for p in frozen:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(False)

    # --- gradients and the step ----------------------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.buffers.zero_grad()

    def step(self, loss_finite: bool = True) -> StepResult:
        self.buffers.densify()
        norm = float(grad_norm(self.params, self.buffers.rows))
        if not (loss_finite and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(norm, applied=False)
        step_with_factor(self.optimizer, self.params, clip_factor(norm, self.max_grad_norm))
        return StepResult(norm, applied=True)


def trunk_on_embeds(view: FastView, embeds: Tensor, attention_mask: Tensor) -> Tensor:
    """A trunk's whole-sequence pass from its input embeddings (what the engine compiles: one
    function for the policy, the reference and the critic)."""
    return view.trunk_on_embeds(embeds, attention_mask)


def check_compile(*views: FastView) -> None:
    """A ConfigError for a model whose view cannot compile its trunk, or on a CPU without the
    C++ compiler that torch.compile builds its kernels with."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise ConfigError("compile=True on CPU needs a C++ compiler (torch.compile builds its "
                          "kernels with one): install g++, or leave compile off.")
    for view in views:
        if not view.compiles:
            raise ConfigError(f"compile=True: {type(view.policy).__name__} does not support "
                              "torch.compile of its trunk (transformers policies and "
                              "TransformerPolicy do); leave compile off.")

"""StreamDiffVSR: one frame of the reference pipeline per call, as numbered steps over the stages.

1. inputs: the LR frame checked once and padded to the model's grid; the starting latent;
2. flow (warm frames): RAFT(bicubic x4 of the frame, of the previous frame) at HR, the previous raw output warped;
3. denoise and decode by the frame size's tile plan: ARTG embedding, 4 DDIM steps, TPM features, decoder;
4. the caller's look-ahead is queued while the GPU works (``on_enqueued``);
5. a NaN/Inf output is recomputed in float32 (half precision) or refused, never carried;
6. the new state carries the raw (unclamped) output and the LR frame.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import NonFiniteInputError, NonFiniteOutputError, PrecisionFallbackWarning
from ..options import Options, dtype_name, parse_device
from ..state import StreamState
from . import inputs
from .components import Components, assemble, load_components
from .denoise import Denoiser
from .flow import FlowStage, FlowTicket
from .model import Model
from .tiled import TiledRunner

__all__ = ["StreamDiffVSR"]

_STATS = ("frames", "tiled_frames", "nan_fallbacks", "oom_fallbacks", "lean_corr_fallbacks", "lr_flow_fallbacks")


class StreamDiffVSR:
    """Stream-DiffVSR x4 video super-resolution, one frame (or one frame of each of B streams) per call.

    Build with :meth:`from_pretrained`; run with :meth:`process_frame`. An instance is a loaded model and a set
    of :class:`~vsstreamdiffvsr.options.Options`; the recurrent state lives in :class:`StreamState`, so one
    instance serves any number of streams. :meth:`with_options` gives a view with other options over the same
    weights. Calls on one model are serialised by its lock.
    """

    def __init__(self, model: Model, options: Options) -> None:
        self.model, self.options = model, options
        self.stats = dict.fromkeys(_STATS, 0)
        self.flow = FlowStage(model, options, self.stats)
        self.denoiser = Denoiser(model, options)
        self.tiler = TiledRunner(model, options, self.stats)
        self.worker = model.runtime.worker(options.uses_cuda_graphs)

    # -- building
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str] | None = None, options: Options | None = None,
                        **fields: Any) -> "StreamDiffVSR":
        """Load a model folder in the Hugging Face layout (:mod:`vsstreamdiffvsr.weights`); None means
        ``$VSSTREAMDIFFVSR_MODEL_DIR`` or the per-user cache. ``options`` and/or option fields as keywords
        (``device="cpu"``). Raises ``ModelFilesError`` for a bad folder, ``ValueError`` for a bad option."""
        opts = _options(options, fields)
        device = parse_device(opts.torch_device)
        opts = dataclasses.replace(opts, device=device)
        opts.warn_cpu_float16()
        comps = load_components(model_dir, device, opts.unet_dtype, opts.vae_precision, opts.nhwc)
        return cls(Model(comps), opts)

    @classmethod
    def from_modules(cls, *, unet: torch.nn.Module, controlnet: torch.nn.Module, vae: torch.nn.Module, raft: Any,
                     scheduler: Any, prompt_embeds: torch.Tensor, options: Options | None = None,
                     **fields: Any) -> "StreamDiffVSR":
        """A pipeline over networks already built in memory (benchmarks, tests): as :meth:`from_pretrained`."""
        opts = _options(options, fields)
        opts = dataclasses.replace(opts, device=parse_device(opts.torch_device))
        comps = assemble(unet=unet.to(opts.unet_dtype), controlnet=controlnet.to(opts.unet_dtype),
                         vae=vae.to(opts.vae_precision), raft=raft, scheduler=scheduler, prompt_embeds=prompt_embeds,
                         device=opts.torch_device, dtype=opts.unet_dtype, channels_last=opts.nhwc)
        return cls(Model(comps), opts)

    def with_options(self, options: Options | None = None, **changes: Any) -> "StreamDiffVSR":
        """A view of this model (no reload, the same lock and compiled functions) with other options. Fields
        fixed at load (device, dtype, vae_dtype, channels_last) cannot change here."""
        opts = dataclasses.replace(options or self.options, **changes)
        for name in ("device", "vae_dtype", "channels_last"):
            if getattr(opts, name) != getattr(self.options, name):
                raise ValueError(f"{name} is fixed when the model loads; load another pipeline for a new {name}")
        if opts.unet_dtype != self.options.unet_dtype:
            raise ValueError("dtype is fixed when the model loads; load another pipeline for a new dtype")
        if opts.raft_dtype is not None and opts.raft_dtype != self.options.raft_dtype:
            opts.warn_cpu_float16()
        return StreamDiffVSR(self.model, opts)

    # -- what callers ask about
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.components.dtype

    @property
    def components(self) -> Components:
        return self.model.components

    @property
    def lock(self) -> Any:
        return self.model.runtime.lock

    @property
    def timesteps(self) -> list[int]:
        """The DDIM timesteps of one frame (999, 749, 499, 249 for the release's scheduler)."""
        return self.model.components.timesteps

    @property
    def latent_channels(self) -> int:
        return self.model.components.latent_channels

    def noise_shape(self, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int]:
        """The shape of the initial latent for LR frames of height x width (padded to the grid)."""
        return inputs.noise_shape(height, width, self.latent_channels, batch)

    # -- frames
    @torch.inference_mode()
    def process_frame(self, lq: torch.Tensor | inputs.LRFrame, state: StreamState | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      flow: FlowTicket | torch.Tensor | None = None,
                      on_enqueued: Callable[[], Any] | None = None) -> tuple[torch.Tensor, StreamState]:
        """Super-resolve one frame.

        Args:
            lq: (1,3,h,w) float RGB in [0,1] on any device, h and w in [32, 4096] (padded to multiples of 4
                inside, the output cropped back); or an :class:`~vsstreamdiffvsr.pipeline.inputs.LRFrame`.
            state: the state returned for the previous frame; None or an empty state is a cold start.
            noise: the initial latent, shape :meth:`noise_shape`; None: drawn from ``generator`` (or torch's RNG).
            flow: this frame's flow against the state's previous frame, from :meth:`prefetch_flow` (or a
                (1,2,4H,4W) tensor); ignored on a cold start.
            on_enqueued: called once this frame's GPU work is queued, before the host waits for it: the place to
                queue the next frame's look-ahead (:meth:`prefetch_flow`). It must not call a CUDA-graph
                pipeline of the same model other than through this one's methods.

        Returns ``(hq, new_state)``: hq (1,3,4h,4w) float32 in [0,1] on this pipeline's device. Raises
        ValueError (bad shape, size, range, or a size other than the state's), NonFiniteInputError,
        NonFiniteOutputError (NaN/Inf that float32 does not cure).
        """
        if flow is not None and not isinstance(flow, (FlowTicket, torch.Tensor)):
            raise ValueError(f"flow must be a FlowTicket from prefetch_flow or a (1,2,4h,4w) tensor, got "
                             f"{type(flow).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if on_enqueued is not None and not callable(on_enqueued):
            raise ValueError(f"on_enqueued must be callable, got {type(on_enqueued).__name__}")
        return self.model.runtime.call(self.worker, self._process, lq, state, noise, generator, flow, on_enqueued)

    def _process(self, lq: Any, state: StreamState | None, noise: torch.Tensor | None,
                 generator: torch.Generator | None, flow: Any, on_enqueued: Callable[[], Any] | None
                 ) -> tuple[torch.Tensor, StreamState]:
        # 1. inputs, checked once; the state must continue this frame size
        frame = lq if isinstance(lq, inputs.LRFrame) else inputs.prepare(lq, self.device)
        if frame.x.device != self.device or frame.x.shape[0] != 1:
            frame = inputs.LRFrame(frame.x[:1].to(self.device), frame.size)  # prepared on the host (a look-ahead)
        state = _check_state(state, frame)
        z = inputs.initial_latent(self.noise_shape(*frame.size), self.device, noise, generator)
        ticket = FlowTicket(flow) if isinstance(flow, torch.Tensor) else flow
        if ticket is not None and tuple(ticket.flow.shape) != (1, 2, 4 * frame.padded[0], 4 * frame.padded[1]):
            raise ValueError(f"flow must have shape (1, 2, {4 * frame.padded[0]}, {4 * frame.padded[1]}), got "
                             f"{tuple(ticket.flow.shape)}")
        with self.model.runtime.frame(self.options.autotune):
            prev = None if state.is_cold else (state.prev_hq, state.prev_lq)
            y = self._frame(frame.x, prev, z, ticket, on_enqueued)
            self.stats["frames"] += 1
        # 6. the raw output is carried, the clamped one delivered
        new_state = StreamState(prev_hq=y, prev_lq=frame.x, frame_count=state.frame_count + 1)
        return frame.crop((y / 2 + 0.5).clamp(0, 1)), new_state

    @torch.inference_mode()
    def process_batch(self, lq: torch.Tensor, states: Sequence[StreamState | None], noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[StreamState]]:
        """Advance B independent streams by one frame each in one batched pass (frames of one size).

        ``lq`` (B,3,h,w) in [0,1]; ``states`` B states (None: cold); ``noise`` (B,C,H,W) as :meth:`noise_shape`
        with ``batch=B``. Cold and warm streams run as two passes. Each stream's frame equals its
        :meth:`process_frame` result within the precision's rounding. Returns (B,3,4h,4w) and the B new states.
        """
        if not isinstance(states, Sequence) or isinstance(lq, torch.Tensor) and len(states) != lq.shape[0]:
            raise ValueError("states must be a list with one StreamState (or None) per frame of lq")
        return self.model.runtime.call(self.worker, self._process_batch, lq, list(states), noise, generator)

    def _process_batch(self, lq: torch.Tensor, states: list[StreamState | None], noise: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, list[StreamState]]:
        frame = inputs.prepare(lq, self.device, batch=None)
        b = frame.x.shape[0]
        checked = [_check_state(s, frame) for s in states]
        z = inputs.initial_latent(self.noise_shape(*frame.size, batch=b), self.device, noise, generator)
        y = torch.empty(b, 3, 4 * frame.padded[0], 4 * frame.padded[1], device=self.device)
        with self.model.runtime.frame(self.options.autotune):
            for cold in (True, False):
                idx = [i for i, s in enumerate(checked) if s.is_cold == cold]
                if idx:
                    prev = None if cold else (torch.cat([checked[i].prev_hq for i in idx]),  # type: ignore[misc]
                                              torch.cat([checked[i].prev_lq for i in idx]))  # type: ignore[misc]
                    y[idx] = self._frame(frame.x[idx], prev, z[idx], None, None)
            self.stats["frames"] += b
        new = [StreamState(prev_hq=y[i: i + 1].clone(), prev_lq=frame.x[i: i + 1].clone(),
                           frame_count=s.frame_count + 1) for i, s in enumerate(checked)]
        return frame.crop((y / 2 + 0.5).clamp(0, 1)), new

    def _frame(self, x01: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None, z: torch.Tensor,
               ticket: FlowTicket | None, on_enqueued: Callable[[], Any] | None) -> torch.Tensor:
        """Steps 2 to 5 on LR frames ``x01`` ([0,1], padded) after ``prev`` (the previous raw output and LR
        frame; None: a cold start): the raw output y."""
        x = x01 * 2.0 - 1.0
        # 2. warm frames: the previous output warped onto this one
        warped = flow_ok = raft_dtype = None
        if prev is not None:
            warped, flow_ok, raft_dtype = self.flow.warp_previous(x, *prev, ticket)
            if self.options.compiled:
                what = f"the denoising ({self.options.compile_mode})"
                self.model.runtime.announce((what, tuple(x.shape[-2:]), self.options.tile), what,
                                            tuple(x.shape[-2:]))  # type: ignore[arg-type]
        # 3. denoise and decode by this size's tile plan
        y = self.tiler.run_planned(self.denoiser, z, x, warped)
        # 4. the caller's look-ahead, before the check below makes the host wait for the GPU
        if on_enqueued is not None:
            on_enqueued()
        # 5. never carry NaN/Inf: recompute in float32 where half precision may be the cause, else refuse
        finite = torch.isfinite(y).all()
        if bool(finite if flow_ok is None else finite & flow_ok):
            return y
        return self._recompute_float32(y, x, prev, z, warped, flow_ok is not None and not bool(flow_ok), raft_dtype)

    def _recompute_float32(self, y: torch.Tensor, x: torch.Tensor, prev: Any, z: torch.Tensor,
                           warped: torch.Tensor | None, bad_flow: bool, raft_dtype: torch.dtype | None
                           ) -> torch.Tensor:
        c = self.model.components
        half = [f"{what} {dtype_name(dt)}" for what, dt in (("U-Net/ControlNet", c.dtype), ("tiny VAE", c.vae_dtype))
                if dt != torch.float32]
        if not self.options.nan_fallback and (half or raft_dtype not in (None, torch.float32)):
            raise NonFiniteOutputError("the frame came out NaN/Inf in half precision and nan_fallback=False: not "
                                       "recomputed in float32 (leave nan_fallback on, or use dtype float32)")
        if not (half or bad_flow):
            raise NonFiniteOutputError("the frame came out NaN/Inf in float32: the model weights (or the state "
                                       "handed in) are broken; check the model folder with `python -m "
                                       "vsstreamdiffvsr check`")
        what = (f"RAFT {dtype_name(raft_dtype or torch.float32)} produced a NaN/Inf flow" if bad_flow
                else f"{' and '.join(half)} produced NaN/Inf")
        self.stats["nan_fallbacks"] += 1
        warnings.warn(f"vsstreamdiffvsr: {what}; frame recomputed in float32", PrecisionFallbackWarning, stacklevel=5)
        del y
        opts32 = dataclasses.replace(self.options, raft_dtype=torch.float32, compile=False, compile_flow=False)
        if bad_flow:  # the flow again, with float32 RAFT (eager: no compile for a rare frame)
            warped = FlowStage(self.model, opts32, self.stats).warp_previous(x, *prev)[0]
        y = self.tiler.run_planned(Denoiser(self.model, opts32, self.model.float32()), z, x, warped)
        if not bool(torch.isfinite(y).all()):  # never carried into the next frame
            raise NonFiniteOutputError("the frame is NaN/Inf even in float32: the model weights are broken "
                                       "(check the model folder)")
        return y

    # -- the flow ahead
    def inputs_ready(self) -> Any:
        """A CUDA event for :meth:`prefetch_flow`'s ``ready`` (None off CUDA); see :meth:`FlowStage.inputs_ready`."""
        return self.flow.inputs_ready()

    @torch.inference_mode()
    def prefetch_flow(self, lq: torch.Tensor, lq_prev: torch.Tensor, ready: Any = None,
                      after: FlowTicket | None = None) -> FlowTicket:
        """Start frame ``lq``'s flow against ``lq_prev`` ((1,3,h,w) in [0,1], padded to multiples of 4) ahead of
        its :meth:`process_frame`, on a side CUDA stream: pass the ticket as ``flow=``. ``ready``: from
        :meth:`inputs_ready`; ``after``: ``lq_prev``'s own ticket, whose RAFT features are reused."""
        inputs.check_shape(lq)
        inputs.check_shape(lq_prev, "lq_prev")
        if lq.shape != lq_prev.shape:
            raise ValueError(f"lq {tuple(lq.shape)} and lq_prev {tuple(lq_prev.shape)} differ in size")
        if after is not None and not isinstance(after, FlowTicket):
            raise ValueError(f"after must be the FlowTicket of lq_prev's own flow, got {type(after).__name__}")
        return self.model.runtime.call(self.worker, self._prefetch, lq, lq_prev, ready, after)

    def _prefetch(self, lq: torch.Tensor, lq_prev: torch.Tensor, ready: Any, after: FlowTicket | None) -> FlowTicket:
        with self.model.runtime.frame(self.options.autotune), torch.inference_mode():
            return self.flow.prefetch(lq, lq_prev, ready, after)


def _options(options: Options | None, fields: dict[str, Any]) -> Options:
    if options is not None and not isinstance(options, Options):
        raise ValueError(f"options must be a vsstreamdiffvsr.Options, got {type(options).__name__}")
    return dataclasses.replace(options, **fields) if options is not None else Options(**fields)


def _check_state(state: StreamState | None, frame: inputs.LRFrame) -> StreamState:
    """``state`` (None: cold), refused when it does not continue ``frame``'s size or holds NaN/Inf."""
    state = state if state is not None else StreamState()
    if not isinstance(state, StreamState):
        raise ValueError(f"state must be a StreamState, got {type(state).__name__}")
    if state.is_cold:
        return state
    if state.lr_size != frame.padded:
        raise ValueError(f"frame size {frame.padded[0]}x{frame.padded[1]} differs from the previous frame's "
                         f"{state.lr_size}; start a new StreamState() for a new size")
    assert state.prev_hq is not None and state.prev_lq is not None
    if not bool(torch.isfinite(state.prev_hq).all() & torch.isfinite(state.prev_lq).all()):
        raise NonFiniteInputError("the state holds NaN or infinite values; start from StreamState() instead")
    return state

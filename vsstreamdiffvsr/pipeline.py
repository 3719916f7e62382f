"""StreamDiffVSR: the per-frame Stream-DiffVSR algorithm (nothing VapourSynth-specific here).

One call of :meth:`StreamDiffVSR.process_frame` is one frame of the reference pipeline:

1. ``x = 2 * lq - 1`` (LR, [-1, 1]);
2. warm frames only: flow = RAFT(bicubic_x4(x), bicubic_x4(x_prev)) at HR, ``warped = warp(prev_hq, flow)``,
   TPM features = tiny-VAE encoder blocks of ``warped`` (deepest first);
3. 4 DDIM steps (v-prediction, trailing, t = 999, 749, 499, 249) on ``z`` (noise, (1,4,h,w)):
   U-Net input ``cat(z, x)``; warm frames add the ControlNet (ARTG) residuals computed with
   ``controlnet_cond = warped`` (its conditioning embedding made once per frame: the same at every step);
   cold frames run the U-Net alone;
4. ``y = decoder(z, TPM features or None)``; ``hq = clamp(y / 2 + 0.5, 0, 1)``; ``y`` (unclamped) is carried.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .accel import CompileFallback, GraphedCall, Worker, check_compiler, compile_cache, own_outputs, run_flags
from .errors import (CompileFallbackWarning, FlowGraphWarning, NonFiniteInputError, NonFiniteOutputError,
                     PrecisionFallbackWarning, TilingFallbackWarning)
from .models.flow import MIN_FLOW_SIDE, RaftFlow, RaftParts, bicubic_x4, warp
from .options import (COMPILE_MODES, CUDA_GRAPH_MODES, DEFAULT_COMPILE_MODE, FLOW_MODES, RAFT_CORR_MODES,
                      check_graph_flow, check_overlap, check_tiling, choice, default_dtype, dtype_name, parse_device,
                      parse_component_dtype, parse_dtype, parse_raft_dtype, raft_input_size, resolve_compile_flow,
                      resolve_corr, resolve_raft_dtype, warn_cpu_float16)
from .state import StreamState
from .tiling import Tile, crop_layout, feather_weight, halve, parse_tile, tile_layout, within

# the exceptions and warnings are part of this module's face (they were defined here first)
__all__ = ["StreamDiffVSR", "FlowTicket", "MIN_LR_SIDE", "NUM_INFERENCE_STEPS", "NonFiniteInputError",
           "NonFiniteOutputError", "PrecisionFallbackWarning", "TilingFallbackWarning", "FlowGraphWarning",
           "CompileFallbackWarning"]

#: The smallest LR side: RAFT runs at 4x and needs 128 px.
MIN_LR_SIDE = MIN_FLOW_SIDE // 4
NUM_INFERENCE_STEPS = 4

#: LR tile used when a frame does not fit in GPU memory and no tile size was given (720p output per tile).
AUTO_TILE = (192, 320)
#: LR pixels of context around each tile of the HR stages, computed and cropped away (at most a quarter of
#: the tile side). An impulse reaches about 40 LR px through the decoder and its TPM features; with 32 the
#: tiles matched the whole frame to 5e-7 (float32 rounding) on calibrated random full-size weights, away
#: from the frame's left and right edges (see :mod:`vsstreamdiffvsr.tiling`).
TILE_MARGIN = 32


class _DenoiseOutOfMemory(torch.OutOfMemoryError):
    """The whole-latent denoising of a frame with tiled HR stages ran out of memory (not a tile)."""


@dataclass
class FlowTicket:
    """The optical flow of a frame, computed ahead by :meth:`StreamDiffVSR.prefetch_flow`.

    On CUDA it may still be running on a side stream; :meth:`result` makes the caller's stream wait.
    """

    flow: torch.Tensor
    event: Any = None
    #: RAFT's feature map of the frame this flow was computed for, and that frame (the caller's tensor), so
    #: the next frame's flow can skip encoding it again (``prefetch_flow(..., after=ticket)``)
    features: torch.Tensor | None = None
    lq: torch.Tensor | None = None
    #: the precision of RAFT's networks that made this flow (a half-precision flow gets the NaN/Inf check);
    #: None for a flow tensor handed to process_frame
    raft_dtype: torch.dtype | None = None

    def result(self) -> torch.Tensor:
        if self.event is not None:
            torch.cuda.current_stream(self.flow.device).wait_event(self.event)
        return self.flow


class StreamDiffVSR:
    """Stream-DiffVSR x4 video super-resolution, one frame at a time.

    Build with :meth:`from_pretrained`; run with :meth:`process_frame`. An instance holds only weights and
    settings (the recurrent state lives in :class:`StreamState`), so one instance serves any number of
    streams; calls are serialised by an internal lock.
    """

    def __init__(self, *, unet: torch.nn.Module, controlnet: torch.nn.Module, vae: torch.nn.Module,
                 scheduler: Any, raft: torch.nn.Module, prompt_embeds: torch.Tensor, device: torch.device,
                 dtype: torch.dtype, num_inference_steps: int = NUM_INFERENCE_STEPS, flow: str = "hr",
                 channels_last: bool | None = None, tile: int | tuple[int, int] | None = None,
                 tile_overlap: int = 16, oom_fallback: bool = True, nan_fallback: bool = True,
                 raft_corr: str = "auto", cudnn_benchmark: bool | None = None,
                 graph_flow: bool | None = None, tile_denoise: bool = False,
                 raft_dtype: torch.dtype | str | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.flow_mode = choice("flow", flow, FLOW_MODES)
        self.raft_corr = choice("raft_corr", raft_corr, RAFT_CORR_MODES)
        self.tile = parse_tile(tile)
        self.tile_overlap = check_overlap(tile_overlap)
        #: with tiles: also run the 4 denoising steps per tile (feathered), not on the whole LR latent
        self.tile_denoise = check_tiling(self.tile, self.tile_overlap, tile_denoise)
        self.oom_fallback = oom_fallback
        self.nan_fallback = nan_fallback
        self.channels_last = (device.type == "cuda") if channels_last is None else bool(channels_last)
        self._fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.cudnn_benchmark = cudnn_benchmark  # None: see the property
        self.tf32 = device.type == "cuda"  # float32 matmuls as the reference runs them (TF32)
        self.graph_flow = check_graph_flow(graph_flow, device)
        self.unet = unet.to(device, memory_format=self._fmt)
        self.controlnet = controlnet.to(device, memory_format=self._fmt)
        #: the ControlNet's conditioning embedding, run once per frame (see _split_cond_embedding)
        self.cond_embedding = _split_cond_embedding(self.controlnet)
        self.vae = vae.to(device, memory_format=self._fmt)
        self.vae_dtype = next(vae.parameters()).dtype
        self.raft = raft.to(device)
        #: the precision of RAFT's networks (``raft_dtype``; float32 is the reference); None: by frame size
        #: (:meth:`raft_dtype_for`)
        self.raft_dtype = parse_raft_dtype(raft_dtype)
        #: RAFT by the precision of its networks, shared with every with_options view (see _raft_net)
        self._raft_nets: dict[torch.dtype, RaftFlow] = {self.raft.compute_dtype: self.raft}
        self._prepare_raft_nets()
        self.scheduler = scheduler
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps: list[int] = [int(t) for t in self.scheduler.timesteps]
        self._t_tensors = [torch.tensor(t, dtype=torch.long, device=device) for t in self.timesteps]
        self.prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        self._prompt_fp32 = prompt_embeds.to(device=device, dtype=torch.float32)
        self.latent_channels = int(self.unet.config.out_channels)
        self.model_dir: str | None = None
        self.lock = threading.RLock()
        self._step_cold = self._eager_step_cold
        self._step_warm = self._eager_step_warm
        self._decode = self.vae.decode
        self._features = self.vae.temporal_features
        self._embed: Callable[[torch.Tensor], torch.Tensor] = self.cond_embedding or _unchanged
        self._fp32_twin: StreamDiffVSR | None = None
        #: the float32 U-Net/ControlNet/embedding of the NaN fallback, loaded once and shared by every view
        self._fp32_weights: dict[str, Any] = {}
        self._tile_cache: dict[tuple, list[tuple[Tile, Any]]] = {}
        self._flow_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.compiled = False
        self.compile_mode: str | None = None
        self.compile_flow = False
        self._flow_backend = "inductor"  # enable_flow_compile's backend
        #: the compile_flow option as given (None: follow compile), so that a view compiling later can honour it
        self._compile_flow_opt: bool | None = None
        self._worker: Worker | None = None
        # compiled functions by (mode, backend), RAFT's by ("raft", backend, its networks' dtype), shared with every
        # with_options view of this pipeline (a shallow copy shares the dict): upscale() called again, or a script
        # reloaded in vspreview, reuses them and their CUDA graphs instead of compiling and recording anew
        self._compiled_sets: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._compiled_shapes: set[tuple[Any, ...]] = set()  # (mode, LR size, tile): announced on stderr
        # prefetched flow recorded as CUDA graphs, by (LR shape, flow mode, raft_corr, raft_dtype); None: recording
        # failed. Shared with with_options views like the compiled functions.
        self._flow_graphs: dict[tuple[Any, ...], GraphedCall | None] = {}
        #: (LR size, flow mode, raft_corr, raft_dtype) -> "lean" or "lr": the RAFT out-of-memory fallback that fitted
        self._flow_fallbacks: dict[tuple[Any, ...], str] = {}
        self._graph_factory: Callable[..., GraphedCall] = GraphedCall
        #: counters for diagnostics and tests
        self.stats = {"frames": 0, "tiled_frames": 0, "nan_fallbacks": 0, "oom_fallbacks": 0,
                      "lean_corr_fallbacks": 0, "lr_flow_fallbacks": 0}

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str] | None = None, device: torch.device | str = "cuda",
                        dtype: torch.dtype | str | None = None, *, flow: str = "hr",
                        channels_last: bool | None = None, compile: bool = False,
                        compile_mode: str = DEFAULT_COMPILE_MODE,
                        compile_cache_dir: str | os.PathLike[str] | None = None,
                        tile: int | tuple[int, int] | None = None, tile_overlap: int = 16,
                        oom_fallback: bool = True, nan_fallback: bool = True,
                        raft_corr: str = "auto", vae_dtype: torch.dtype | str | None = None,
                        cudnn_benchmark: bool | None = None, graph_flow: bool | None = None,
                        compile_flow: bool | None = None, tile_denoise: bool = False,
                        raft_dtype: torch.dtype | str | None = None) -> "StreamDiffVSR":
        """Load from a model folder in the Hugging Face layout (see :mod:`vsstreamdiffvsr.weights`).

        Args:
            model_dir: the folder; None means ``$VSSTREAMDIFFVSR_MODEL_DIR`` or the per-user cache.
            device: where to run (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
            dtype: U-Net and ControlNet precision; None = float16 on CUDA (:func:`default_dtype`), float32
                elsewhere. ``float32`` is the exact reference path; with float16 or bfloat16 the DDIM maths,
                the optical flow and the tiny VAE stay in float32.
            flow: ``"hr"`` (reference: RAFT on the bicubic x4 frames) or ``"lr"`` (faster deviation: RAFT
                on the LR frames, flow upsampled x4 with values x4; needs LR >= 128 px per side).
            channels_last: NHWC weights/activations for U-Net and ControlNet (default: on CUDA).
            compile: ``torch.compile`` the warm denoising step (U-Net + ControlNet), TPM encoder and decoder
                (cold frames, one per start, seek or scene cut, run eagerly: half the compile time).
            compile_mode: torch.compile mode: ``"reduce-overhead"`` (CUDA graphs, the default; frames then run
                on one worker thread per GPU), ``"default"`` or ``"max-autotune"`` (also graphs).
            compile_cache_dir: on-disk cache of compiled kernels (default ``<user cache>/inductor``).
            compile_flow: also ``torch.compile`` RAFT (mode "default", never CUDA graphs: it runs beside the
                denoising's graphs on a stream of its own). None = with ``compile`` on CUDA. RAFT is bound by
                GPU work, much of it elementwise and normalisation kernels a compiler fuses. Compiled in
                parts (:class:`~vsstreamdiffvsr.models.flow.RaftParts`): the refinement update compiles once
                and runs 12 times. The lean correlation (``raft_corr``, 4K) always runs eagerly: its chunked
                lookups unroll into a large graph (one update took 49 s to compile on the CPU at a 256x320
                input, and a 4K frame has many more chunks) for a path bound by memory traffic.
            tile: LR tile size (int or (h, w), multiples of 8); None = whole frames. The stages at HR size
                (ARTG's condition embedding, the TPM encoder, the decoder: most of the memory) run per tile
                with ``TILE_MARGIN`` LR px of context cropped away, which gives the untiled values (tile
                sides of 128 or more; smaller tiles get a quarter of their side and are close, not exact);
                the 4 denoising steps run on the whole LR latent unless ``tile_denoise``.
            tile_overlap: LR pixels shared by neighbouring denoising tiles (feathered), a multiple of 4 and at
                most half the smaller tile side.
            tile_denoise: with ``tile`` (required), denoise per tile too (feathered): less memory, but
                GroupNorm and attention then see a tile, not the frame, so the picture moves (PSNR in the
                README).
            oom_fallback: on CUDA out-of-memory, recompute the frame in tiles, then with the denoising tiled
                too, then in smaller tiles, and keep the setting that fitted.
            nan_fallback: a half-precision frame with NaN/Inf is recomputed in float32 (one warning).
            raft_corr: RAFT's correlation: ``"full"`` (torchvision's all-pairs float32 pyramid, the reference),
                ``"half"`` (that pyramid stored in float16: half the memory, values rounded to the 11 bits TF32
                keeps of the matmul's inputs; each level one matmul with pooled features, on CUDA in float16),
                ``"lean"`` (no (HW/64)^2 volume: the same flow up to rounding,
                far less memory, much more time) or ``"auto"``: full up to a 2 GiB pyramid (720p output),
                half up to 4 GiB stored (1080p), lean above (4K).
            vae_dtype: precision of the tiny VAE (TPM features and decoder); None = float32. Half precision
                is faster at HR but is not the reference numerics: measure it with scripts/bench.py.
            raft_dtype: precision of RAFT's networks (feature and context encoders, update block, mask head):
                ``"float32"`` (the reference), ``"float16"``, ``"bfloat16"``, or None / ``"auto"``: float16
                where RAFT's input is past 720p output (1080p and up with ``flow="hr"``) on CUDA when ``dtype``
                is float16 (the CUDA default), float32 otherwise
                (:func:`~vsstreamdiffvsr.options.resolve_raft_dtype` says why). Half precision is RAFT's own
                mixed-precision recipe: the correlation, its lookups, the flow coordinates and the x8 upsampling
                stay in float32. Not the reference numerics (the flow moves by ~1e-3 px on random weights); a
                frame whose half-precision flow has NaN/Inf is recomputed with float32 RAFT (``nan_fallback``).
                bfloat16 moves it ~10x more.
            cudnn_benchmark: let cuDNN time its convolution algorithms for each new shape and keep the
                fastest (default: on for CUDA, off with compile's CUDA graphs: there, autotuning while the
                graphs warm up peaked at 27 GiB allocated at 720p on an H100, for 3% speed). It is set only
                while this pipeline runs, then restored.
            graph_flow: record the flow computed ahead (:meth:`prefetch_flow`: bicubic x4 and RAFT's 12
                updates, about a thousand kernels) as one CUDA graph per frame size and replay it, so that
                launching it does not hold up the host (CUDA only; default off). The same numbers; if recording
                fails the flow runs eagerly, with one warning. On an H100 it did not pay: RAFT is bound by
                GPU work there (27.5 ms graphed against 30 ms eager at 720p), and the compiled pipeline ran
                1.5 ms slower with it (3.9 ms with RAFT compiled); it may help where the host is slow.

        Raises:
            ModelFilesError: a file is missing, truncated, corrupt or does not match its config.
            ValueError: a bad device, dtype or option.
        """
        from . import weights

        dev = parse_device(device)
        dt = parse_dtype(dtype if dtype is not None else default_dtype(dev))
        vae_dt = parse_component_dtype("vae_dtype", vae_dtype)
        raft_dt = parse_raft_dtype(raft_dtype)
        warn_cpu_float16(dev, dtype=dt, vae_dtype=vae_dt, raft_dtype=raft_dt)
        choice("compile_mode", compile_mode, COMPILE_MODES)
        # RAFT is checked by loading it, first: its ~20 MB are read once, and still before the large files
        root = weights.validate_model_dir(model_dir, need_raft=False)
        raft = weights.load_raft(root)
        pipe = cls(unet=weights.load_unet(root, dt), controlnet=weights.load_controlnet(root, dt),
                   vae=weights.load_vae(root, vae_dt),
                   scheduler=weights.load_scheduler(root),
                   raft=raft, prompt_embeds=weights.empty_prompt_embedding(root),
                   device=dev, dtype=dt, flow=flow, channels_last=channels_last, tile=tile,
                   tile_overlap=tile_overlap, oom_fallback=oom_fallback, nan_fallback=nan_fallback,
                   raft_corr=raft_corr, cudnn_benchmark=cudnn_benchmark, graph_flow=graph_flow,
                   tile_denoise=tile_denoise, raft_dtype=raft_dt)
        pipe.model_dir = str(root)
        if compile:
            pipe.enable_compile(mode=compile_mode, cache_dir=compile_cache_dir)
        pipe._compile_flow_opt = compile_flow
        if resolve_compile_flow(compile_flow, compile, dev):
            pipe.enable_flow_compile(cache_dir=compile_cache_dir)
        return pipe

    def with_options(self, *, flow: str | None = None, tile: int | tuple[int, int] | None | str = "keep",
                     tile_overlap: int | None = None, oom_fallback: bool | None = None,
                     nan_fallback: bool | None = None, compile: bool = False,
                     compile_mode: str = DEFAULT_COMPILE_MODE,
                     compile_cache_dir: str | os.PathLike[str] | None = None,
                     raft_corr: str | None = None, graph_flow: bool | None = None,
                     compile_flow: bool | None = None, tile_denoise: bool | None = None,
                     raft_dtype: torch.dtype | str | None = None) -> "StreamDiffVSR":
        """A pipeline sharing this one's weights and lock (no reload) with other run-time settings.

        Arguments left at None (``tile`` at ``"keep"``) keep this pipeline's value; see :meth:`from_pretrained`.
        ``compile_flow=None`` on a view that compiles a pipeline not compiled before follows ``compile``, as in
        :meth:`from_pretrained`, unless the pipeline was given ``compile_flow=False``.
        """
        choice("compile_mode", compile_mode, COMPILE_MODES)
        view = copy.copy(self)
        view.stats = dict.fromkeys(self.stats, 0)
        view._fp32_twin = None
        if flow is not None:
            view.flow_mode = choice("flow", flow, FLOW_MODES)
        if tile != "keep":
            view.tile = parse_tile(tile)  # type: ignore[arg-type]
            view.tile_denoise = False  # a new tile size starts from the whole-latent denoising
        if tile_denoise is not None:
            view.tile_denoise = tile_denoise
        if tile_overlap is not None:
            view.tile_overlap = check_overlap(tile_overlap)
        if tile != "keep" or tile_overlap is not None or tile_denoise is not None:
            # only what is asked for here: a tile the out-of-memory fallback shrank may sit under the overlap
            # (tile_layout caps it), and a view of that pipeline must not fail for it
            view.tile_denoise = check_tiling(view.tile, view.tile_overlap, view.tile_denoise)
        if raft_corr is not None:
            view.raft_corr = choice("raft_corr", raft_corr, RAFT_CORR_MODES)
        if raft_dtype is not None:
            view.raft_dtype = parse_raft_dtype(raft_dtype)  # "auto": back to the choice by frame size
            if view.raft_dtype is not None:
                warn_cpu_float16(self.device, raft_dtype=view.raft_dtype)
            view._prepare_raft_nets()
        if graph_flow is not None:
            view.graph_flow = check_graph_flow(graph_flow, self.device)
        if oom_fallback is not None:
            view.oom_fallback = oom_fallback
        if nan_fallback is not None:
            view.nan_fallback = nan_fallback
        if compile and (not self.compiled or self.compile_mode != compile_mode):
            view.enable_compile(mode=compile_mode, cache_dir=compile_cache_dir)
        if compile_flow is not None:
            view._compile_flow_opt = compile_flow
        elif compile and not self.compiled and self._compile_flow_opt is None:
            compile_flow = resolve_compile_flow(None, True, self.device)  # compiling now: RAFT too, unless told not to
        if compile_flow and not self.compile_flow:
            view.enable_flow_compile(cache_dir=compile_cache_dir)
        elif compile_flow is False:
            view.compile_flow = False
        return view

    def enable_compile(self, mode: str = DEFAULT_COMPILE_MODE, cache_dir: str | os.PathLike[str] | None = None,
                       backend: str = "inductor") -> None:
        """``torch.compile`` the warm denoising step, the TPM encoder and the warm decoder (static shapes).

        Cold frames (the U-Net alone, the decoder without TPM features) come once per start, seek or scene
        cut, so they stay eager: compiling them would double the first-run compile time for one frame each.
        Kernels are cached on disk (``cache_dir``, default ``<user cache>/inductor``), so only the first
        run on a machine pays the full compile time.
        """
        choice("compile_mode", mode, COMPILE_MODES)
        check_compiler(self.device, backend)
        compile_cache(cache_dir)
        opts = dict(mode=mode, dynamic=False, backend=backend, fullgraph=False)
        if backend != "inductor":
            opts.pop("mode")
        key = (mode, backend)
        if key not in self._compiled_sets:
            graphs = own_outputs if mode in CUDA_GRAPH_MODES else (lambda fn: fn)
            fallback = CompileFallback("the denoising", "compile=False")

            def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
                return fallback.wrap(graphs(torch.compile(fn, **opts)), fn)

            # torch's CUDA-graph trees are per thread: graphs recorded on one VapourSynth worker thread would
            # be recorded again, each with its own memory pool, on every other one. All frames of graphed
            # pipelines therefore run on one thread per device (Worker.for_device).
            self._compiled_sets[key] = (wrap(self._eager_step_warm), wrap(self.vae.decode),
                                        wrap(self.vae.temporal_features),
                                        wrap(self.cond_embedding) if self.cond_embedding else _unchanged,
                                        Worker.for_device(self.device) if mode in CUDA_GRAPH_MODES else None)
        self._step_warm, self._decode, self._features, self._embed, self._worker = self._compiled_sets[key]
        self.compiled = True
        self.compile_mode = mode

    def enable_flow_compile(self, cache_dir: str | os.PathLike[str] | None = None, backend: str = "inductor") -> None:
        """``torch.compile`` RAFT (mode "default", static shapes; see ``compile_flow`` in :meth:`from_pretrained`).

        Never CUDA graphs: the flow runs on a side stream while the denoising's graphs replay, and graph trees
        share one memory pool per thread, which two streams must not use at once.
        """
        check_compiler(self.device, backend)
        compile_cache(cache_dir)
        self._flow_backend = backend
        self.compile_flow = True

    def raft_dtype_for(self, height: int, width: int) -> torch.dtype:
        """The precision of RAFT's networks for RAFT input of this size: :attr:`raft_dtype`, or where that is
        None (auto) float16 from 1080p output on CUDA for a float16 pipeline, else float32
        (:func:`~vsstreamdiffvsr.options.resolve_raft_dtype`)."""
        return resolve_raft_dtype(self.raft_dtype, self.dtype, self.device, height, width)

    def _raft_net(self, dtype: torch.dtype) -> RaftFlow:
        """RAFT (:class:`~vsstreamdiffvsr.models.flow.RaftFlow`) with its networks in ``dtype``: a half-precision
        copy (10 MB) made once and shared by every view of this pipeline (see :meth:`_prepare_raft_nets`)."""
        net = self._raft_nets.get(dtype)
        if net is None:
            # made here only if _prepare_raft_nets could not foresee it: outside inference mode (ordinary
            # weights), and finished before any stream reads it
            with torch.inference_mode(False):
                net = self._raft_nets[dtype] = self.raft.with_dtype(dtype)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return net

    def _prepare_raft_nets(self) -> None:
        """Make the half-precision RAFT this pipeline may choose (:meth:`raft_dtype_for`) now, before frames
        run: made on first use, its cast would be queued on whichever stream computes the first such flow,
        and a flow computed ahead on the side stream, which waits only for its inputs, could read the
        weights before the cast has run."""
        if self.raft_dtype is not None:
            self._raft_net(self.raft_dtype)
        elif self.device.type == "cuda" and self.dtype == torch.float16:
            self._raft_net(torch.float16)  # auto picks it from 1080p

    def _raft_entry(self, dtype: torch.dtype) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """RAFT's flow_and_features in ``dtype``: eager, or (:attr:`compile_flow`) with compiled parts, made once
        per (backend, precision) and shared by every view."""
        net = self._raft_net(dtype)
        if not self.compile_flow:
            return net.flow_and_features
        key = ("raft", self._flow_backend, dtype)
        if key not in self._compiled_sets:
            opts = dict(dynamic=False, backend=self._flow_backend, fullgraph=False)
            if self._flow_backend == "inductor":
                opts["mode"] = "default"
            # each part on its own (RaftParts): the update compiles once and runs 12 times, instead of a graph
            # with the 12 updates unrolled, which took most of a cold compile's time
            fallback = CompileFallback("the optical flow", "compile_flow=False")
            parts = RaftParts._make(fallback.wrap(torch.compile(fn, **opts), fn) for fn in net.parts)
            self._compiled_sets[key] = (functools.partial(net.flow_and_features, parts=parts),)
        return self._compiled_sets[key][0]

    @property
    def cudnn_benchmark(self) -> bool:
        """cuDNN autotuning while this pipeline runs (the ``cudnn_benchmark`` option; None resolved here)."""
        if self._cudnn_benchmark is not None:
            return self._cudnn_benchmark
        return self.device.type == "cuda" and not (self.compiled and self.compile_mode in CUDA_GRAPH_MODES)

    @cudnn_benchmark.setter
    def cudnn_benchmark(self, value: bool | None) -> None:
        self._cudnn_benchmark = None if value is None else bool(value)

    # ---------------------------------------------------------------------------------------- checks
    @staticmethod
    def _check_lq_shape(lq: Any, name: str = "lq") -> None:
        """Type, shape and size of an LR frame (no look at the values: no device sync)."""
        if not isinstance(lq, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (1,3,h,w), got {type(lq).__name__}")
        if lq.dim() != 4 or lq.shape[0] != 1 or lq.shape[1] != 3:
            raise ValueError(f"{name} must have shape (1,3,h,w), got {tuple(lq.shape)}")
        if not lq.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [0,1], got {lq.dtype} (divide 8-bit data by 255)")
        h, w = int(lq.shape[2]), int(lq.shape[3])
        if h % 4 or w % 4:
            raise ValueError(f"{name} height and width must be multiples of 4, got {h}x{w} (pad the frame first)")
        if h < MIN_LR_SIDE or w < MIN_LR_SIDE:
            raise ValueError(f"{name} must be at least {MIN_LR_SIDE}x{MIN_LR_SIDE} (RAFT needs {MIN_FLOW_SIDE} px "
                             f"at 4x), got {h}x{w}")

    def _check_lq(self, lq: Any) -> torch.Tensor:
        self._check_lq_shape(lq)
        x = lq.to(device=self.device, dtype=torch.float32)
        if x is lq:  # never keep the caller's buffer in the state: a reader may refill it for the next frame
            x = x.clone()
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
            raise NonFiniteInputError("lq contains NaN or infinite values; fix the source frame")
        if not (lo_f >= 0.0 and hi_f <= 1.0):
            raise ValueError(f"lq values must lie in [0,1], got min {lo_f:.4g}, max {hi_f:.4g} (clamp the input)")
        return x

    def _noise(self, h: int, w: int, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        shape = (1, self.latent_channels, h, w)
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
                got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"noise must have shape {shape}, got {got}")
            if not noise.is_floating_point() or not bool(torch.isfinite(noise).all()):
                # it would make every frame NaN from here on, through the recurrence
                raise NonFiniteInputError("noise must be a float tensor without NaN or infinite values")
            return noise.to(device=self.device, dtype=torch.float32)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(self.device)

    # ------------------------------------------------------------------------------------------ steps
    def corr_for(self, height: int, width: int) -> str:
        """The RAFT correlation (``"full"``, ``"half"`` or ``"lean"``) used for RAFT input of this size."""
        return resolve_corr(self.raft_corr, height, width)

    def compute_flow(self, x: torch.Tensor, x_prev: torch.Tensor, mode: str | None = None,
                     corr: str | None = None) -> torch.Tensor:
        """Flow current -> previous at HR (N,2,4h,4w), from LR frames in [-1, 1].

        ``mode`` overrides the pipeline's flow mode; ``corr`` its correlation choice (:meth:`corr_for`).
        """
        return self._flow_and_features(x, x_prev, mode, corr)[0]

    def _flow_and_features(self, x: torch.Tensor, x_prev: torch.Tensor, mode: str | None = None,
                           corr: str | None = None, previous_features: torch.Tensor | None = None,
                           eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`compute_flow` and RAFT's feature map of ``x``; ``previous_features`` is that of ``x_prev``
        from the previous call (ignored if it does not fit, e.g. after a change of flow mode). ``eager``: never
        the compiled RAFT (the out-of-memory fallbacks: no compile of a new shape under memory pressure)."""
        mode = mode or self.flow_mode
        if mode == "lr":
            if min(x.shape[-2:]) < MIN_FLOW_SIDE:
                raise ValueError(f'flow="lr" needs LR frames of at least {MIN_FLOW_SIDE} px per side, got '
                                 f'{tuple(x.shape[-2:])}; use flow="hr"')
            prepare = _pad8  # RAFT needs multiples of 8; LR is only a multiple of 4
        else:
            prepare = bicubic_x4
        a = prepare(x)
        if previous_features is not None and tuple(previous_features.shape[-2:]) != (a.shape[-2] // 8,
                                                                                     a.shape[-1] // 8):
            previous_features = None  # another frame size or flow mode: RAFT encodes x_prev itself
        b = prepare(x_prev) if previous_features is None else None  # kept features: RAFT needs no image
        # an explicit corr is the out-of-memory fallback's: eager, rather than compiling RAFT anew at that moment.
        # The lean correlation is eager too: its chunked lookups unroll into a large graph (see compile_flow).
        use = corr or self.corr_for(*a.shape[-2:])
        dtype = self.raft_dtype_for(*a.shape[-2:])
        own = not eager and corr is None and use != "lean"
        raft = self._raft_entry(dtype) if own else self._raft_net(dtype).flow_and_features
        if own and self.compile_flow:
            precision = "" if dtype == torch.float32 else f", {dtype_name(dtype)}"
            self._announce_compile(tuple(x.shape[-2:]),
                                   what=f"{use} correlation, RAFT at {mode.upper()}{precision}")
        flow, features = raft(a, b, corr=use, previous_features=previous_features)
        if mode == "lr":
            flow = flow[..., : x.shape[-2], : x.shape[-1]]
            flow = F.interpolate(flow, scale_factor=4, mode="bilinear", align_corners=False) * 4
        return flow, features

    def _eager_step_cold(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([z.to(self.dtype), x], dim=1)
        return self.unet(inp, t, encoder_hidden_states=self.prompt_embeds, return_dict=False)[0]

    def _eager_step_warm(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One warm step; ``cond`` is the conditioning *embedding* of the warped frame (:attr:`cond_embedding`)."""
        inp = torch.cat([z.to(self.dtype), x], dim=1)
        down, mid = self.controlnet(inp, t, encoder_hidden_states=self.prompt_embeds, controlnet_cond=cond,
                                    conditioning_scale=1.0, guess_mode=False, return_dict=False)
        return self.unet(inp, t, encoder_hidden_states=self.prompt_embeds, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    def denoise(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """The 4 DDIM steps on float32 ``z``; ``warped`` None means a cold frame (U-Net alone).

        ``cond``: the conditioning embedding of ``warped`` when already made (in tiles: :meth:`_embed_tiled`).
        """
        x_in = x.to(self.dtype).contiguous(memory_format=self._fmt)
        # the ControlNet's conditioning embedding of the warped frame: the same at all 4 steps, so made once
        if cond is None and warped is not None:
            cond = self._embed(warped.to(self.dtype).contiguous(memory_format=self._fmt))
        for t, t_dev in zip(self.timesteps, self._t_tensors):
            if cond is None:
                v = self._step_cold(z, x_in, t_dev)
            else:
                v = self._step_warm(z, x_in, t_dev, cond)
            z = self.scheduler.step(v.float(), t, z, eta=0.0).prev_sample
        return z

    def _denoise_decode(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None) -> torch.Tensor:
        """TPM features of ``warped``, 4 DDIM steps, decode: raw y as float32 (CUDA-graph outputs come back as
        copies, :func:`own_outputs`, so y is safe to carry)."""
        if warped is None:
            return self.vae.decode(self.denoise(z, x, None).to(self.vae_dtype), None).float()
        feats = self._features(warped.to(self.vae_dtype))
        return self._decode(self.denoise(z, x, warped).to(self.vae_dtype), feats).float()

    def _tiles(self, h: int, w: int, tile: tuple[int, int], denoise: bool) -> list[tuple[Tile, Any]]:
        """Denoising tiles with their feathered weights (``denoise``), or HR-stage (tile, core) pairs; built
        once per (frame size, tile, overlap, kind)."""
        key = (h, w, tile, self.tile_overlap, denoise)
        cached = self._tile_cache.get(key)
        if cached is None:
            if denoise:
                tiles = tile_layout(h, w, tile, self.tile_overlap)
                cached = [(t, feather_weight(t, tiles, h, w, 4, self.device)) for t in tiles]
            else:
                cached = crop_layout(h, w, tile, TILE_MARGIN)
            self._tile_cache = {key: cached}  # one layout at a time
        return cached

    def _run(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None,
             tile: tuple[int, int] | None, tile_denoise: bool = False) -> torch.Tensor:
        """Denoise and decode: raw y (1,3,4h,4w). Whole frame; or the HR stages in cropped tiles around the
        whole-latent denoising; or (``tile_denoise``) everything in tiles blended with feathered weights."""
        h, w = x.shape[-2:]
        tiles = self._tiles(h, w, tile, tile_denoise) if tile is not None else []
        if len(tiles) <= 1:
            return self._denoise_decode(z, x, warped)
        if not tile_denoise:
            y = self._run_hr_tiles(z, x, warped, tiles)
        else:
            acc = torch.zeros(1, 3, 4 * h, 4 * w, device=self.device, dtype=torch.float32)
            wsum = torch.zeros(1, 1, 4 * h, 4 * w, device=self.device, dtype=torch.float32)
            for t, wt in tiles:
                (ly, lx), (hy, hx) = t.lr(), t.hr()
                w_t = warped[..., hy, hx] if warped is not None else None
                acc[..., hy, hx] += self._denoise_decode(z[..., ly, lx], x[..., ly, lx], w_t) * wt
                wsum[..., hy, hx] += wt
            y = acc / wsum
        self.stats["tiled_frames"] += 1
        return y

    def _run_hr_tiles(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None,
                      tiles: list[tuple[Tile, Tile]]) -> torch.Tensor:
        """The 4 steps on the whole LR latent; ARTG's embedding, TPM encoder and decoder per tile, each
        computed with its margin of context and cropped to its core (the cores partition the frame)."""
        h, w = x.shape[-2:]
        # a ControlNet that keeps its embedding (BGR-order models) embeds the whole warped frame itself
        cond = None if warped is None or self.cond_embedding is None else self._embed_tiled(warped, tiles)
        try:
            latent = self.denoise(z, x, warped, cond=cond).to(self.vae_dtype)
        except torch.OutOfMemoryError as exc:
            message = f"out of memory in the whole-latent denoising: {exc}"
        else:
            message = None
        del cond
        if message is not None:  # raised outside the handler: the failed attempt's frames (and tensors) go
            # tells the fallback to tile the denoising too, rather than shrink tiles that did fit
            raise _DenoiseOutOfMemory(message)
        y = torch.empty(1, 3, 4 * h, 4 * w, device=self.device, dtype=torch.float32)
        for t, core in tiles:
            feats = None if warped is None else self._features(warped[(..., *t.hr())].to(self.vae_dtype))
            decode = self._decode if feats is not None else self.vae.decode  # cold frames stay eager
            out = decode(latent[(..., *t.lr())], feats)
            y[(..., *core.hr())] = out[(..., *within(core, t, 4))].float()
            del feats, out  # before the next tile's are made: one tile's features at a time
        return y

    def _embed_tiled(self, warped: torch.Tensor, tiles: list[tuple[Tile, Tile]]) -> torch.Tensor:
        """ARTG's conditioning embedding of the HR ``warped`` frame, made per tile and cropped: (1,C,h,w)."""
        out: torch.Tensor | None = None
        for t, core in tiles:
            e = self._embed(warped[(..., *t.hr())].to(self.dtype).contiguous(memory_format=self._fmt))
            if out is None:
                h, w = warped.shape[-2] // 4, warped.shape[-1] // 4
                out = torch.empty(1, e.shape[1], h, w, device=e.device, dtype=e.dtype).contiguous(
                    memory_format=self._fmt)
            out[(..., *core.lr())] = e[(..., *within(core, t, 1))]
            del e
        assert out is not None
        return out

    def _flow_with_fallbacks(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """Flow; on out-of-memory, the lean correlation (same flow), then, for flow="hr", flow at LR."""
        return self._flow_features_with_fallbacks(x, x_prev)[0]

    def _flow_features_with_fallbacks(self, x: torch.Tensor, x_prev: torch.Tensor,
                                      previous_features: torch.Tensor | None = None
                                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_flow_with_fallbacks` with RAFT's features of ``x`` (None after a fallback).

        The fallback that fitted is kept for later frames of this size (as the tiling fallback is): running
        out of memory again on every frame would cost each frame that attempt and fragment the allocator."""
        key = self._flow_fallback_key(x)
        fallback = self._flow_fallbacks.get(key)
        if fallback is None:
            try:
                return self._flow_and_features(x, x_prev, previous_features=previous_features)
            except torch.OutOfMemoryError:
                if not self.oom_fallback:
                    raise
            _empty_cache(self.device)
            self.stats["lean_corr_fallbacks"] += 1
            fallback = "lean"
        if fallback == "lean":
            try:
                flow = self.compute_flow(x, x_prev, corr="lean")
                self._keep_flow_fallback(key, "lean")
                return flow, None
            except torch.OutOfMemoryError:
                if self.flow_mode != "hr" or min(x.shape[-2:]) < MIN_FLOW_SIDE:
                    raise
            _empty_cache(self.device)
            self.stats["lr_flow_fallbacks"] += 1
            warnings.warn("vsstreamdiffvsr: RAFT at HR ran out of GPU memory; using flow at LR from now on for this "
                          "frame size (a documented deviation)", TilingFallbackWarning, stacklevel=6)
            self._keep_flow_fallback(key, "lr")
        return self._flow_and_features(x, x_prev, mode="lr", eager=True)[0], None

    def _flow_fallback_key(self, x: torch.Tensor) -> tuple[Any, ...]:
        """The key of :attr:`_flow_fallbacks` for LR frames of ``x``'s size under this pipeline's settings."""
        return tuple(x.shape[-2:]), self.flow_mode, self.raft_corr, self.raft_dtype

    def _keep_flow_fallback(self, key: tuple[Any, ...], fallback: str) -> None:
        # a new dict, not an update: views from with_options share the parent's until they choose their own
        if self._flow_fallbacks.get(key) != fallback:
            self._flow_fallbacks = {**self._flow_fallbacks, key: fallback}

    def _run_shrinking_tiles(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None,
                             in_denoise: bool, error: str) -> torch.Tensor:
        """After an out-of-memory error (``error``), until the frame fits: the HR stages in tiles (the picture
        of the whole frame); where the whole-latent denoising itself ran out (``in_denoise``), that in tiles
        too; otherwise smaller tiles. The setting that fitted stays in use."""
        h, w = x.shape[-2:]
        setting: tuple[tuple[int, int] | None, bool] | None = (self.tile, self.tile_denoise)
        while True:
            _empty_cache(self.device)
            setting = self._next_tiling(h, w, *setting, in_denoise)  # type: ignore[misc]
            if setting is None:
                raise torch.OutOfMemoryError(f"vsstreamdiffvsr: out of GPU memory for a {w}x{h} LR frame even in "
                                             f"the smallest tiles; free GPU memory or use another GPU ({error})")
            tile, tile_denoise = setting
            what = "denoising and decoding" if tile_denoise else "decoding (the denoising whole)"
            warnings.warn(f"vsstreamdiffvsr: out of GPU memory; {what} in {tile[0]}x{tile[1]} LR tiles from now "
                          "on (pass tile= / tile_denoise= to choose)", TilingFallbackWarning, stacklevel=5)
            try:
                y = self._run(z, x, warped, tile, tile_denoise)
            except torch.OutOfMemoryError as exc:
                in_denoise, error = isinstance(exc, _DenoiseOutOfMemory), str(exc).splitlines()[0][:300]
                continue  # the loop's next _empty_cache runs outside this handler
            self.tile, self.tile_denoise = tile, tile_denoise
            return y

    def _next_tiling(self, h: int, w: int, tile: tuple[int, int] | None, tile_denoise: bool,
                     in_denoise: bool) -> tuple[tuple[int, int], bool] | None:
        """The setting the out-of-memory fallback tries after ``(tile, tile_denoise)`` failed, skipping those
        that would run the frame as a single tile again (tiles as large as the frame); None when none is left.
        """
        while True:
            if tile is None:
                tile = AUTO_TILE
            elif in_denoise and not tile_denoise:
                tile_denoise = True
            elif halve(tile) == tile:
                return None
            else:
                tile = halve(tile)
            if len(self._tiles(h, w, tile, tile_denoise)) > 1:
                return tile, tile_denoise

    def _fp32(self) -> "StreamDiffVSR":
        """A float32 twin sharing prompt, float32 RAFT and (unless half precision) VAE, for the NaN fallback;
        built on first use, its float32 weights shared by every view of the model."""
        if self._fp32_twin is None:
            shared = self._fp32_weights  # one float32 copy per model, whatever the number of views
            if not shared:
                half_vae = self.vae_dtype != torch.float32  # part of the precision too: a float32 copy
                if self.model_dir is not None:
                    from . import weights

                    root = weights.resolve_model_dir(self.model_dir)
                    unet = weights.load_unet(root, torch.float32)
                    controlnet = weights.load_controlnet(root, torch.float32)
                    embedding = _split_cond_embedding(controlnet)
                    vae = weights.load_vae(root, torch.float32) if half_vae else self.vae
                else:
                    unet, controlnet = copy.deepcopy(self.unet).float(), copy.deepcopy(self.controlnet).float()
                    embedding = copy.deepcopy(self.cond_embedding).float() if self.cond_embedding is not None else None
                    vae = copy.deepcopy(self.vae).float() if half_vae else self.vae
                shared.update({name: None if m is None else m.to(self.device, memory_format=self._fmt)
                               for name, m in dict(unet=unet, controlnet=controlnet, embedding=embedding,
                                                   vae=vae).items()})
            twin = copy.copy(self)
            twin.unet, twin.controlnet, twin.cond_embedding = shared["unet"], shared["controlnet"], shared["embedding"]
            twin._embed = twin.cond_embedding or _unchanged
            twin.dtype = torch.float32
            twin.stats = dict.fromkeys(self.stats, 0)
            twin.compiled = False
            twin.prompt_embeds = self._prompt_fp32
            twin._step_cold, twin._step_warm = twin._eager_step_cold, twin._eager_step_warm
            twin.vae, twin.vae_dtype = shared["vae"], torch.float32
            twin._decode, twin._features = twin.vae.decode, twin.vae.temporal_features
            twin.raft_dtype, twin.compile_flow, twin.graph_flow = torch.float32, False, False
            twin.nan_fallback = False
            twin._fp32_twin = None
            self._fp32_twin = twin
        return self._fp32_twin

    def inputs_ready(self) -> Any:
        """A CUDA event marking what the caller's stream has queued so far (None off CUDA).

        Record it once the next frame's tensor exists, and pass it as ``prefetch_flow(..., ready=)`` from
        :meth:`process_frame`'s ``on_enqueued``: the side stream then waits for the inputs only, not for
        the denoising queued since.
        """
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @torch.inference_mode()
    def prefetch_flow(self, lq: torch.Tensor, lq_prev: torch.Tensor, ready: Any = None,
                      after: FlowTicket | None = None) -> FlowTicket:
        """Start the optical flow of frame ``lq`` (against ``lq_prev``) ahead of its :meth:`process_frame`.

        The flow depends on the inputs only, so it can run while the previous frame is still denoising:
        on CUDA it is queued on a side stream. Pass the ticket as ``flow=`` when processing ``lq`` with the
        state of ``lq_prev``. Inputs are (1,3,h,w) in [0,1]; they are validated by :meth:`process_frame`.

        Best called from :meth:`process_frame`'s ``on_enqueued`` (the host then queues RAFT while the GPU
        denoises), with ``ready`` from :meth:`inputs_ready`. Without ``ready`` the side stream waits for
        everything queued on the caller's stream, which is always safe but serialises after that work.

        ``after``: the ticket of ``lq_prev``'s own flow, if it was prefetched; RAFT then reuses the feature
        map it made of ``lq_prev`` (one of its three encoder passes; the same numbers). It is used only if
        that ticket was made for this very tensor object (``after.lq is lq_prev``): do not refill a tensor
        in place and pass it again.
        """
        self._check_lq_shape(lq)
        self._check_lq_shape(lq_prev, "lq_prev")
        if lq.shape != lq_prev.shape:
            raise ValueError(f"lq {tuple(lq.shape)} and lq_prev {tuple(lq_prev.shape)} differ in size")
        if after is not None and not isinstance(after, FlowTicket):
            raise ValueError(f"after must be the FlowTicket of lq_prev's own flow, got {type(after).__name__}")
        if self._worker is not None and not self._worker.on_it():
            return self._on_worker(self.prefetch_flow, lq, lq_prev, ready, after)
        previous_features = after.features if after is not None and after.lq is lq_prev else None
        stream = self._flow_stream
        with self.lock, torch.inference_mode(), run_flags(self.cudnn_benchmark, self.tf32):
            if stream is not None:
                if ready is not None:
                    stream.wait_event(ready)
                else:
                    stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                a = lq.to(self.device, torch.float32)
                b = lq_prev.to(self.device, torch.float32)
                if stream is not None:
                    for t in (lq, lq_prev, a, b):
                        if t.is_cuda:  # made on the caller's stream, read on this one: keep it alive for both
                            t.record_stream(stream)
                flow, features = self._prefetched_flow(a * 2.0 - 1.0, b * 2.0 - 1.0, previous_features)
                raft_dtype = self._flow_dtype(a)  # after the flow: an out-of-memory fallback may have chosen LR
                if stream is None:
                    return FlowTicket(flow, features=features, lq=lq, raft_dtype=raft_dtype)
                event = torch.cuda.Event()
                event.record(stream)
            flow.record_stream(torch.cuda.current_stream(self.device))
            # features stay on the side stream
            return FlowTicket(flow, event, features=features, lq=lq, raft_dtype=raft_dtype)

    def _prefetched_flow(self, x: torch.Tensor, x_prev: torch.Tensor, previous_features: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flow on the side stream (and RAFT's features of ``x``): replayed from a CUDA graph
        (:attr:`graph_flow`, recorded on first use; no feature reuse there), or computed."""
        if not self.graph_flow:
            return self._flow_features_with_fallbacks(x, x_prev, previous_features)
        key = (tuple(x.shape), self.flow_mode, self.raft_corr, self.raft_dtype)
        graphs = self._flow_graphs
        if key not in graphs:
            while len(graphs) >= 2:  # one graph per frame size in use; each pool holds RAFT's memory
                del graphs[next(iter(graphs))]
            graphs[key] = self._record_flow(x, x_prev)
        graphed = graphs[key]
        return (graphed(x, x_prev), None) if graphed is not None else self._flow_features_with_fallbacks(x, x_prev)

    def _record_flow(self, x: torch.Tensor, x_prev: torch.Tensor) -> GraphedCall | None:
        try:
            return self._graph_factory(self.compute_flow, x, x_prev)
        except Exception as exc:  # recording is an optimisation: any failure leaves the eager flow
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        _empty_cache(self.device)
        warnings.warn(f"vsstreamdiffvsr: could not record the optical flow as a CUDA graph ({reason}); computing it "
                      "eagerly instead (same result, slower; graph_flow=False silences this)", FlowGraphWarning,
                      stacklevel=5)
        return None

    @torch.inference_mode()
    def process_frame(self, lq: torch.Tensor, state: StreamState | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None,
                      flow: FlowTicket | torch.Tensor | None = None,
                      on_enqueued: Callable[[], Any] | None = None) -> tuple[torch.Tensor, StreamState]:
        """Super-resolve one frame.

        Args:
            lq: (1,3,h,w) float RGB in [0,1] on any device; h, w multiples of 4 and >= 32.
            state: the state returned for the previous frame; None or an empty state is a cold start.
            noise: (1,4,h,w) initial latent; if None it is drawn from ``generator`` (or torch's global RNG).
            generator: a torch.Generator for the noise draw (its device is where the draw happens).
            flow: this frame's flow against the state's previous frame, computed ahead
                (:meth:`prefetch_flow`, or a (1,2,4h,4w) tensor); ignored on a cold start.
            on_enqueued: called once this frame's GPU work is queued, before the host waits for it: the
                place to queue overlapping work, such as :meth:`prefetch_flow` of the next frame. It must
                not call a CUDA-graph pipeline of the same model other than through this one's methods.

        Call it with the default CUDA stream current (as the filter does): a pipeline compiled with CUDA
        graphs runs frames on a worker thread of its own, whose stream is the default one, and does not
        order its work after a side stream of the caller's.

        Returns:
            ``(hq, new_state)``: hq is (1,3,4h,4w) float32 in [0,1] on this pipeline's device.

        Raises:
            ValueError: wrong shape, dtype, range or size, or a frame size different from the state's.
        """
        if flow is not None and not isinstance(flow, (FlowTicket, torch.Tensor)):
            raise ValueError(f"flow must be a FlowTicket from prefetch_flow or a (1,2,4h,4w) tensor, got "
                             f"{type(flow).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if on_enqueued is not None and not callable(on_enqueued):
            raise ValueError(f"on_enqueued must be callable, got {type(on_enqueued).__name__}")
        if self._worker is not None and not self._worker.on_it():
            return self._on_worker(self.process_frame, lq, state, noise, generator, flow, on_enqueued)
        state = state if state is not None else StreamState()
        if not isinstance(state, StreamState):
            raise ValueError(f"state must be a StreamState, got {type(state).__name__}")
        lq32 = self._check_lq(lq)
        h, w = int(lq32.shape[2]), int(lq32.shape[3])
        if not state.is_cold and state.lr_size != (h, w):
            raise ValueError(f"frame size {h}x{w} differs from the previous frame's {state.lr_size}; "
                             "start a new StreamState() for a new size")
        z = self._noise(h, w, noise, generator).clone()  # an inference tensor like every later latent
        if isinstance(flow, torch.Tensor):
            flow = FlowTicket(flow)
        if flow is not None and tuple(flow.flow.shape) != (1, 2, 4 * h, 4 * w):
            raise ValueError(f"flow must have shape (1, 2, {4 * h}, {4 * w}), got {tuple(flow.flow.shape)}")
        with self.lock, run_flags(self.cudnn_benchmark, self.tf32):
            y = self._frame(lq32, state, z, flow, on_enqueued)
            self.stats["frames"] += 1
        hq = (y / 2 + 0.5).clamp(0, 1)
        return hq, StreamState(prev_hq=y, prev_lq=lq32, frame_count=state.frame_count + 1)

    def _frame(self, lq32: torch.Tensor, state: StreamState, z: torch.Tensor, ticket: FlowTicket | None = None,
               on_enqueued: Callable[[], Any] | None = None) -> torch.Tensor:
        x = lq32 * 2.0 - 1.0
        warped = None
        flow_ok: torch.Tensor | None = None  # a half-precision RAFT's flow is finite (read with the output's check)
        raft_dtype: torch.dtype | None = None  # the precision of RAFT's networks that made the flow
        if not state.is_cold:
            warped, flow_ok, raft_dtype = self._warped_previous(x, state, ticket)
            if self.compiled:
                self._announce_compile(tuple(x.shape[-2:]))
        y = self._run_or_tile(z, x, warped)
        if on_enqueued is not None:
            on_enqueued()  # before the NaN check below makes the host wait for the GPU
        half = [f"{what} {dtype_name(dt)}" for what, dt in
                (("U-Net/ControlNet", self.dtype), ("tiny VAE", self.vae_dtype)) if dt != torch.float32]
        if self.nan_fallback and (half or flow_ok is not None) and not self._finite(y, flow_ok):
            bad_flow = flow_ok is not None and not bool(flow_ok)
            if bad_flow:
                what = f"RAFT {dtype_name(raft_dtype or torch.float32)} produced a NaN/Inf flow"
            else:
                what = f"{' and '.join(half) or 'the model'} produced NaN/Inf"
            self.stats["nan_fallbacks"] += 1
            warnings.warn(f"vsstreamdiffvsr: {what}; frame recomputed in float32", PrecisionFallbackWarning,
                          stacklevel=4)
            del y
            twin = self._fp32()
            twin.tile, twin.tile_denoise = self.tile, self.tile_denoise
            if bad_flow:  # the flow again, with float32 RAFT (eager: no compile on a rare frame)
                warped, _, _ = twin._warped_previous(x, state)
            y = twin._run_or_tile(z, x, warped)
            self.tile, self.tile_denoise = twin.tile, twin.tile_denoise
            if not bool(torch.isfinite(y).all()):  # never carried into the next frame
                raise NonFiniteOutputError("the frame is NaN/Inf even in float32: the model weights are broken "
                                           "(check the model folder)")
        return y

    def _warped_previous(self, x: torch.Tensor, state: StreamState, ticket: FlowTicket | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype | None]:
        """The previous raw output warped onto frame ``x`` ([-1, 1]) by the flow of ``ticket`` or, without one,
        this pipeline's RAFT; for a half-precision RAFT's flow under ``nan_fallback``, whether that flow is
        finite (a 0-dim tensor, read with the output's check: no host sync here), else None; and the precision
        of RAFT's networks that made the flow (None: a flow tensor handed in). Checked apart from the output,
        which such a flow makes NaN: the fallback must recompute the flow, not reuse it, and a float32 U-Net
        beside a half-precision RAFT must fall back too."""
        assert state.prev_lq is not None and state.prev_hq is not None
        if ticket is not None:
            flow, raft_dtype = ticket.result().to(self.device), ticket.raft_dtype
        else:
            x_prev = state.prev_lq.to(self.device, torch.float32) * 2.0 - 1.0
            flow = self._flow_with_fallbacks(x, x_prev)
            raft_dtype = self._flow_dtype(x)
        half_raft = raft_dtype is not None and raft_dtype != torch.float32
        flow_ok = torch.isfinite(flow).all() if self.nan_fallback and half_raft else None
        return warp(state.prev_hq.to(self.device, torch.float32), flow), flow_ok, raft_dtype

    def _flow_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The precision of RAFT's networks for LR frame ``x``'s flow as this pipeline computes it: in its flow
        mode, or at LR where RAFT at HR ran out of memory for this size (the kept fallback)."""
        mode = "lr" if self._flow_fallbacks.get(self._flow_fallback_key(x)) == "lr" else self.flow_mode
        return self.raft_dtype_for(*raft_input_size(x.shape[-2], x.shape[-1], mode))

    @staticmethod
    def _finite(y: torch.Tensor, flow_ok: torch.Tensor | None) -> bool:
        """Whether ``y`` has no NaN/Inf and ``flow_ok`` (if given) holds: one host sync for both."""
        finite = torch.isfinite(y).all()
        return bool(finite if flow_ok is None else finite & flow_ok)

    def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the graphed pipelines' worker thread, which takes this model's lock: a caller that
        holds the lock itself (a callback reaching another view of the model) would wait on it forever."""
        assert self._worker is not None
        if self.lock._is_owned():  # type: ignore[attr-defined]  # RLock's own test of its holder
            raise RuntimeError("vsstreamdiffvsr: a CUDA-graph pipeline was called while this thread holds the "
                               "model's lock (from a process_frame callback, or inside `with pipe.lock`); call it "
                               "after that returns")
        return self._worker.run(fn, *args)

    def _announce_compile(self, lr_size: tuple[int, ...], what: str = "") -> None:
        """One line on stderr before a new shape compiles, so a first run does not look hung. ``what``: the
        optical flow's compile (its correlation), else the denoising's."""
        key = (what or self.compile_mode, lr_size, None if what else self.tile)
        if key in self._compiled_shapes:
            return
        self._compiled_shapes.add(key)
        part = f"the optical flow ({what})" if what else f"the denoising ({self.compile_mode})"
        # stderr, never stdout: vspipe writes the video there
        sys.stderr.write(f"vsstreamdiffvsr: compiling {part} for {lr_size[1]}x{lr_size[0]} input; the first time "
                         "on a machine this takes a few minutes, later runs reuse the kernel cache\n")
        sys.stderr.flush()

    def _run_or_tile(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_run` with this pipeline's tiling; on out-of-memory, retry in tiles (if allowed)."""
        try:
            return self._run(z, x, warped, self.tile, self.tile_denoise)
        except torch.OutOfMemoryError as exc:
            if not self.oom_fallback:
                raise
            in_denoise, error = isinstance(exc, _DenoiseOutOfMemory), str(exc).splitlines()[0][:300]
        # retried outside the except block: its traceback would keep the failed attempt's tensors alive
        self.stats["oom_fallbacks"] += 1
        return self._run_shrinking_tiles(z, x, warped, in_denoise, error)


def _split_cond_embedding(controlnet: torch.nn.Module) -> torch.nn.Module | None:
    """Take the conditioning embedding out of a diffusers ControlNet, to run it once per frame; returns it.

    The ControlNet embeds its condition (the warped previous frame, at HR: conv-SiLU layers from 3 to 256
    channels, two of them at full HR size) at every call, and the reference calls it at each of the 4 steps
    with the same condition. The embedding is replaced by an identity, and the pipeline passes the
    embedding, computed once, as ``controlnet_cond``: the same numbers, three fewer HR passes per frame.
    Left in place (None returned) for a model whose condition is flipped to BGR before embedding.
    """
    embedding = getattr(controlnet, "controlnet_cond_embedding", None)
    config = getattr(controlnet, "config", None)
    order = getattr(config, "controlnet_conditioning_channel_order", "rgb")
    if embedding is None or isinstance(embedding, torch.nn.Identity) or order != "rgb":
        return None
    controlnet.controlnet_cond_embedding = torch.nn.Identity()
    return embedding


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def _pad8(x: torch.Tensor) -> torch.Tensor:
    """LR frames padded (replicated edge) to the size ``flow="lr"`` runs RAFT at (:func:`raft_input_size`, whose
    size also picks RAFT's correlation and precision)."""
    h, w = x.shape[-2:]
    rh, rw = raft_input_size(h, w, "lr")
    ph, pw = rh - h, rw - w
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

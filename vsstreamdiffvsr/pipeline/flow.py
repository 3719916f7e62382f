"""Stage 2, optical flow: RAFT per network precision and correlation, its out-of-memory ladder, the flow computed
ahead on a side stream (a :class:`FlowTicket`), and the previous output warped onto the current frame."""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import TilingFallbackWarning
from ..models.flow import MIN_FLOW_SIDE, RaftParts, bicubic_x4, warp
from ..options import Options, dtype_name, raft_input_size
from . import compiling
from .compiling import CompileFallback, check_compiler, compile_cache
from .model import Model

__all__ = ["FlowStage", "FlowTicket"]


@dataclass
class FlowTicket:
    """The flow of a frame computed ahead (:meth:`FlowStage.prefetch`); on CUDA it may still be running on the
    side stream, and :meth:`result` makes the caller's stream wait for it."""

    flow: torch.Tensor
    event: Any = None
    #: RAFT's feature map of the frame this flow was computed for, and that frame (the caller's tensor), so the
    #: next frame's flow can skip encoding it again
    features: torch.Tensor | None = None
    lq: torch.Tensor | None = None
    #: the precision of RAFT's networks that made it (a half-precision flow gets the NaN/Inf check); None for a
    #: flow tensor handed in
    raft_dtype: torch.dtype | None = None

    def result(self) -> torch.Tensor:
        if self.event is not None:
            torch.cuda.current_stream(self.flow.device).wait_event(self.event)
        return self.flow


class FlowStage:
    """Flow current -> previous at HR from LR frames in [-1, 1], as ``options`` ask (mode, correlation, precision,
    compile), with the fallbacks that kept frames of a size running kept for later frames of that size."""

    def __init__(self, model: Model, options: Options, stats: dict[str, int]) -> None:
        self.model, self.options, self.stats = model, options, stats
        self.device = model.device
        if options.flow_compiled:
            check_compiler(self.device, compiling.BACKEND)
            compile_cache(options.compile_cache_dir)
        # the half-precision RAFT this stage may choose, made now: a cast queued on first use could race with a
        # flow computed ahead on the side stream, which waits only for its inputs
        if options.raft_dtype is not None:
            model.components.raft(options.raft_dtype)  # type: ignore[arg-type]
        elif self.device.type == "cuda" and options.unet_dtype == torch.float16:
            model.components.raft(torch.float16)  # auto picks it from 1080p

    # -- choices
    def dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """RAFT's precision for LR frames ``x`` as this stage computes them (at LR where HR ran out of memory)."""
        mode = "lr" if self.model.flow_fallbacks.get(self.key(x)) == "lr" else self.options.flow
        return self.options.raft_dtype_for(*raft_input_size(x.shape[-2], x.shape[-1], mode))

    def key(self, x: torch.Tensor) -> tuple[Any, ...]:
        """Where the out-of-memory rung that fitted LR frames of ``x``'s size is kept (``Model.flow_fallbacks``)."""
        o = self.options
        return tuple(x.shape[-2:]), o.flow, o.raft_corr, o.raft_dtype

    def _entry(self, dtype: torch.dtype) -> Any:
        """RAFT's flow_and_features in ``dtype``: eager, or with compiled parts (the update compiles once and runs
        12 times), made once per (backend, precision) and shared by every view."""
        net = self.model.components.raft(dtype)
        if not self.options.flow_compiled:
            return net.flow_and_features

        backend = compiling.BACKEND

        def make() -> dict[str, Any]:
            fallback = CompileFallback("the optical flow", "compile_flow=False")
            opts: dict[str, Any] = dict(dynamic=False, fullgraph=False, backend=backend)
            if backend == "inductor":
                opts["mode"] = "default"  # never CUDA graphs: it runs on a side stream beside the denoising's
            parts = RaftParts._make(fallback.wrap(torch.compile(fn, **opts), fn) for fn in net.parts)
            return {"flow": functools.partial(net.flow_and_features, parts=parts)}

        return self.model.compiled_set(("raft", backend, dtype), make)["flow"]

    # -- one flow
    def flow_and_features(self, x: torch.Tensor, x_prev: torch.Tensor | None, mode: str | None = None,
                          corr: str | None = None, previous_features: torch.Tensor | None = None,
                          eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow (B,2,4h,4w) and RAFT's feature map of ``x``; ``previous_features`` is that of ``x_prev`` from the
        previous call (ignored if it does not fit). ``mode``/``corr`` override the options (the fallbacks';
        ``eager``: never compiled, no compile of a new shape under memory pressure)."""
        mode = mode or self.options.flow
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
        b = prepare(x_prev) if previous_features is None and x_prev is not None else None
        # the lean correlation runs eagerly: its chunked lookups unroll into a large graph for a memory-bound path
        use = corr or self.options.corr_for(*a.shape[-2:])
        dtype = self.options.raft_dtype_for(*a.shape[-2:])
        own = not eager and corr is None and use != "lean"
        raft = self._entry(dtype) if own else self.model.components.raft(dtype).flow_and_features
        if own and self.options.flow_compiled:
            precision = "" if dtype == torch.float32 else f", {dtype_name(dtype)}"
            what = f"the optical flow ({use} correlation, RAFT at {mode.upper()}{precision})"
            self.model.runtime.announce((what, tuple(x.shape[-2:])), what, tuple(x.shape[-2:]))  # type: ignore[arg-type]
        flow, features = raft(a, b, corr=use, previous_features=previous_features)
        if mode == "lr":
            flow = flow[..., : x.shape[-2], : x.shape[-1]]
            flow = F.interpolate(flow, scale_factor=4, mode="bilinear", align_corners=False) * 4
        return flow, features

    def compute(self, x: torch.Tensor, x_prev: torch.Tensor, previous_features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flow and ``x``'s features (None after a fallback). On out-of-memory: the lean correlation (the same
        flow), then for ``flow="hr"`` flow at LR (a deviation, with a warning); the rung that fitted is kept for
        this frame size, so later frames do not pay the failed attempts."""
        fallbacks, key = self.model.flow_fallbacks, self.key(x)
        rung = fallbacks.get(key)
        if rung is None:
            try:
                return self.flow_and_features(x, x_prev, previous_features=previous_features)
            except torch.OutOfMemoryError:
                if not self.options.oom_fallback:
                    raise
            self.model.empty_cache()  # outside the handler: its traceback would hold the failed tensors
            self.stats["lean_corr_fallbacks"] += 1
            rung = "lean"
        if rung == "lean":
            try:
                flow = self.flow_and_features(x, x_prev, corr="lean")[0]
                fallbacks[key] = "lean"
                return flow, None
            except torch.OutOfMemoryError:
                if self.options.flow != "hr" or min(x.shape[-2:]) < MIN_FLOW_SIDE:
                    raise
            self.model.empty_cache()
            self.stats["lr_flow_fallbacks"] += 1
            warnings.warn("vsstreamdiffvsr: RAFT at HR ran out of GPU memory; using flow at LR from now on for this "
                          "frame size (a documented deviation)", TilingFallbackWarning, stacklevel=6)
            fallbacks[key] = "lr"
        return self.flow_and_features(x, x_prev, mode="lr", eager=True)[0], None

    # -- ahead, and the warp
    def inputs_ready(self) -> Any:
        """A CUDA event marking what the caller's stream has queued so far (None off CUDA): the side stream then
        waits for the next frame's inputs only, not for the denoising queued since."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def prefetch(self, lq: torch.Tensor, lq_prev: torch.Tensor, ready: Any = None,
                 after: FlowTicket | None = None) -> FlowTicket:
        """Start the flow of LR frame ``lq`` ([0,1]) against ``lq_prev`` on the side stream; ``after``: the ticket
        of ``lq_prev``'s own flow, whose feature map of ``lq_prev`` RAFT then reuses (only if made for this very
        tensor object)."""
        previous_features = after.features if after is not None and after.lq is lq_prev else None
        stream = self.model.flow_stream
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
            flow, features = self.compute(a * 2.0 - 1.0, b * 2.0 - 1.0, previous_features)
            raft_dtype = self.dtype_for(a)  # after the flow: an out-of-memory fallback may have chosen LR
            if stream is None:
                return FlowTicket(flow, features=features, lq=lq, raft_dtype=raft_dtype)
            event = torch.cuda.Event()
            event.record(stream)
        flow.record_stream(torch.cuda.current_stream(self.device))
        return FlowTicket(flow, event, features=features, lq=lq, raft_dtype=raft_dtype)  # features stay there

    def warp_previous(self, x: torch.Tensor, prev_hq: torch.Tensor, prev_lq: torch.Tensor,
                      ticket: FlowTicket | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype | None]:
        """The previous raw output ``prev_hq`` warped onto frame ``x`` ([-1, 1]) from the previous LR frame
        ``prev_lq`` ([0, 1]) by the flow of ``ticket`` or one computed now;
        for a half-precision RAFT's flow under ``nan_fallback``, whether it is finite (a 0-dim tensor, read with
        the output's check: no sync here), else None; and the RAFT precision that made it (None: handed in)."""
        if ticket is not None:
            flow, raft_dtype = ticket.result().to(self.device), ticket.raft_dtype
        else:
            x_prev = prev_lq.to(self.device, torch.float32) * 2.0 - 1.0
            flow = self.compute(x, x_prev)[0]
            raft_dtype = self.dtype_for(x)
        half = raft_dtype is not None and raft_dtype != torch.float32
        flow_ok = torch.isfinite(flow).all() if self.options.nan_fallback and half else None
        return warp(prev_hq.to(self.device, torch.float32), flow), flow_ok, raft_dtype


def _pad8(x: torch.Tensor) -> torch.Tensor:
    """LR frames padded (replicated edge) to the size ``flow="lr"`` runs RAFT at (:func:`raft_input_size`)."""
    h, w = x.shape[-2:]
    rh, rw = raft_input_size(h, w, "lr")
    ph, pw = rh - h, rw - w
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x

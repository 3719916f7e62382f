"""``vsstreamdiffvsr.upscale(clip, ...)``: the VapourSynth filter.

Checks up front with plain messages, one model per (folder, device, dtype) per process, and one
:class:`~vsstreamdiffvsr.filter.producer.OrderedProducer` per call that keeps the recurrence exact under
VapourSynth's parallel, out-of-order requests. Each step hands the next one what it computed ahead for it
(the next frame's LR tensor, its flow on the side stream, its noise) in the carry.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import vapoursynth as vs

from ..errors import NonFiniteInputError
from ..options import Options, parse_device
from ..pipeline import StreamDiffVSR
from ..pipeline.flow import FlowTicket
from ..pipeline.inputs import MAX_LR_SIDE, MIN_LR_SIDE, LRFrame, frame_noise
from ..state import StreamState
from .frames import frame_to_lr, python_stdout_to_stderr, stdout_to_stderr, tensor_to_frame
from .producer import OrderedProducer, SourceError, SourceFrame

__all__ = ["upscale", "get_pipeline"]

core = vs.core

_PIPES: dict[tuple[str, str, str, str], StreamDiffVSR] = {}
_PIPES_LOCK = threading.Lock()


def get_pipeline(model_dir: str | os.PathLike[str] | None, options: Options) -> StreamDiffVSR:
    """The process-wide model for (folder, device, dtype, vae_dtype), loaded once; a view with ``options``."""
    from ..weights import resolve_model_dir

    options = dataclasses.replace(options, device=parse_device(options.torch_device))
    key = (str(resolve_model_dir(model_dir)), str(options.device), str(options.unet_dtype), str(options.vae_precision))
    with _PIPES_LOCK:
        base = _PIPES.get(key)
        if base is None:
            with stdout_to_stderr():
                base = StreamDiffVSR.from_pretrained(key[0], options=options)
            _PIPES[key] = base
    return base.with_options(dataclasses.replace(options, channels_last=base.options.channels_last))


def upscale(clip: vs.VideoNode, *, model_dir: str | os.PathLike[str] | None = None, device: str | None = None,
            dtype: str | None = None, seed: int = 0, tile: int | tuple[int, int] | None = None,
            compile: bool | None = None, warmup: int = 0, reset_on_scene_change: bool = True,
            max_gap: int | None = None, options: Options | None = None) -> vs.VideoNode:
    """Stream-DiffVSR x4 super-resolution of an RGBS/RGBH clip.

    Args:
        clip: constant-format, constant-size RGBS or RGBH, 32 to 4096 px per side, progressive; values are
            clamped to [0, 1]. Sizes that are not multiples of 4 are padded (edge replicate) and cropped back.
        model_dir: the model folder (default ``$VSSTREAMDIFFVSR_MODEL_DIR`` or the per-user cache; fill it with
            ``python -m vsstreamdiffvsr download``).
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"`` (default: ``options.device``, ``"cuda"``).
        dtype: U-Net/ControlNet precision; None = float16 on CUDA, float32 elsewhere.
        seed: noise seed; frame n's noise is a pure function of (seed, n).
        tile: LR tile size (int or (h, w), multiples of 8) for the HR stages of large frames; None = whole
            frames, tiled automatically when they would not fit.
        compile: ``torch.compile`` the denoising and decoder; None = on for CUDA (the first frames of a new size
            wait for the compiler, announced on stderr; kernels are cached on disk), off on the CPU.
        warmup: frames computed and discarded before a seek target.
        reset_on_scene_change: a frame with ``_SceneChangePrev`` = 1 starts a new run.
        max_gap: requests up to this many frames ahead of the last produced frame are caught up exactly;
            None = ``max(16, 2 * core.num_threads)``; keep it >= vspipe's ``-r``.
        options: every other option (:class:`~vsstreamdiffvsr.options.Options`); the keywords above win.

    Returns the same format at 4x width and height; each frame carries its own source frame's props (and
    ``_FieldBased`` = 0). Frame-order rules: output n is the run over frames s..n, s being frame 0, the last
    scene cut, a seek point or the frame after a source frame that failed; playing forward gives the same bytes
    for any thread count and request depth up to ``max_gap`` (README, *Frame order*).
    """
    _check_clip(clip)
    opts = _merge(options, device=device, dtype=dtype, tile=tile, compile=compile)
    for name, value, lo in (("max_gap", max_gap, 1), ("warmup", warmup, 0), ("seed", seed, None)):
        if value is None and name == "max_gap":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo):
            raise vs.Error(f"upscale: {name} must be an integer{f' >= {lo}' if lo is not None else ''}, got {value!r}")
    if not isinstance(reset_on_scene_change, bool):  # "0" from a vspipe -a argument is truthy
        raise vs.Error(f"upscale: reset_on_scene_change must be True or False, got {reset_on_scene_change!r}")
    if opts.flow == "lr" and min(clip.width, clip.height) < 128:
        raise vs.Error(f'upscale: flow="lr" needs a clip of at least 128x128, got {clip.width}x{clip.height}; '
                       'use flow="hr"')
    _check_progressive(clip)
    gap = max_gap if max_gap is not None else max(16, 2 * core.num_threads)
    if core.num_threads > gap:
        warnings.warn(f"upscale: core.num_threads ({core.num_threads}) > max_gap ({gap}): parallel requests may "
                      "arrive further ahead than max_gap and be treated as seeks; raise max_gap", stacklevel=2)
    try:
        pipe = get_pipeline(model_dir, opts)
    except Exception as exc:  # ModelFilesError, a bad option, no CUDA...: one clear line
        raise vs.Error(f"upscale: {exc}") from None
    return _Filter(clip, pipe, seed=seed, warmup=warmup, reset=reset_on_scene_change, max_gap=gap).node


def _merge(options: Options | None, **keywords: Any) -> Options:
    if options is not None and not isinstance(options, Options):
        raise vs.Error(f"upscale: options must be a vsstreamdiffvsr.Options, got {type(options).__name__}")
    given = {k: v for k, v in keywords.items() if v is not None}
    try:
        return dataclasses.replace(options or Options(), **given)
    except ValueError as exc:
        raise vs.Error(f"upscale: {exc}") from None


_FORMAT_FIX = {
    vs.YUV: 'convert first, e.g. core.resize.Bicubic(clip, format=vs.RGBS, matrix_in_s="709") (the source '
            "matrix must be known: use the clip's _Matrix prop or name it, as here)",
    vs.GRAY: "convert first, e.g. core.resize.Point(clip, format=vs.RGBS) after making it RGB",
}


def _check_clip(clip: Any) -> None:
    if not isinstance(clip, vs.VideoNode):
        raise vs.Error("upscale: clip must be a vs.VideoNode")
    fmt = clip.format
    if fmt is None or fmt.id == vs.PresetVideoFormat.NONE or fmt.color_family == vs.UNDEFINED:
        raise vs.Error("upscale: clip must have a constant format; convert with core.resize.Bicubic(clip, "
                       "format=vs.RGBS, ...) first")
    if fmt.id not in (vs.RGBS, vs.RGBH):
        fix = _FORMAT_FIX.get(fmt.color_family, "convert first, e.g. core.resize.Point(clip, format=vs.RGBS)")
        raise vs.Error(f"upscale: only RGBS and RGBH clips are supported, got {fmt.name}; {fix}")
    if clip.width == 0 or clip.height == 0:
        raise vs.Error("upscale: clip must have a constant frame size; resize it to one size first")
    if min(clip.width, clip.height) < MIN_LR_SIDE or max(clip.width, clip.height) > MAX_LR_SIDE:
        raise vs.Error(f"upscale: clip sides must be {MIN_LR_SIDE} to {MAX_LR_SIDE} px (RAFT needs {4 * MIN_LR_SIDE} "
                       f"px after x4; beyond {MAX_LR_SIDE} one output frame no longer fits a GPU), got "
                       f"{clip.width}x{clip.height}; resize or crop the clip first")


_INTERLACED_FIX = ("deinterlace it first (e.g. core.bwdif.Bwdif(clip, field=1) or QTGMC), or if the content is "
                   "progressive and only flagged otherwise, core.std.SetFieldBased(clip, 0)")


def _check_progressive(clip: vs.VideoNode) -> None:
    """Frame 0's ``_FieldBased`` up front (each later frame is checked as it comes): the model sees whole frames,
    and fields woven into one frame come out as combing, four times larger."""
    try:
        field_based = int(clip.get_frame(0).props.get("_FieldBased", 0))
    except vs.Error:
        return  # the source's own error belongs to frame 0, when it is asked for
    if field_based in (1, 2):
        raise vs.Error(f"upscale: the clip is interlaced (_FieldBased={field_based}); {_INTERLACED_FIX}")


def _source_tensor(i: int, frame: vs.VideoFrame, device: torch.device) -> LRFrame:
    field_based = int(frame.props.get("_FieldBased", 0))
    if field_based in (1, 2):
        raise ValueError(f"source frame {i} is interlaced (_FieldBased={field_based}); {_INTERLACED_FIX}")
    try:
        return frame_to_lr(frame, device)
    except NonFiniteInputError:
        raise ValueError(f"source frame {i} contains NaN or infinite values; fix the source (e.g. replace them "
                         "with std.Expr) before upscaling") from None


@dataclass(frozen=True)
class _Ahead:
    """What frame ``index - 1``'s step computed for frame ``index``."""

    index: int
    lr: LRFrame
    noise: torch.Tensor
    flow: FlowTicket


@dataclass(frozen=True)
class _Carry:
    """What one step hands the next: the recurrent state, and the next frame's inputs computed ahead."""

    state: StreamState = field(default_factory=StreamState)
    ahead: _Ahead | None = None


class _ClipSource:
    """Source frames for the producer: the frame asked for is fetched synchronously (legal from a frame callback
    for an upstream clip), and the next two are requested asynchronously, to be used by a look-ahead only once
    they have arrived (waiting on them inside a callback could starve a one-thread core)."""

    def __init__(self, clip: vs.VideoNode, reset: bool) -> None:
        self.clip, self.reset = clip, reset
        self._pending: dict[int, Future[vs.VideoFrame]] = {}

    def _wrap(self, frame: vs.VideoFrame) -> SourceFrame[vs.VideoFrame]:
        return SourceFrame(frame, scene_cut=bool(frame.props.get("_SceneChangePrev", 0)))

    def fetch(self, i: int) -> SourceFrame[vs.VideoFrame]:
        pending = self._pending.pop(i, None)
        self._pending = {j: f for j, f in self._pending.items() if i < j <= i + 2}
        for j in range(i + 1, min(i + 3, self.clip.num_frames)):
            if j not in self._pending:
                self._pending[j] = self.clip.get_frame_async(j)
        if pending is not None and pending.done() and pending.exception() is None:
            return self._wrap(pending.result())
        try:
            return self._wrap(self.clip.get_frame(i))
        except vs.Error as exc:
            raise SourceError(f"source frame {i} failed: {_last_line(exc)}") from None

    def peek(self, i: int) -> SourceFrame[vs.VideoFrame] | None:
        pending = self._pending.get(i)
        if pending is None or not pending.done() or pending.exception() is not None:
            return None
        return self._wrap(pending.result())


def _last_line(exc: BaseException) -> str:
    """The message of an error from an upstream filter: VapourSynth hands a Python filter's error on with its
    traceback, whose last line is the error itself."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    last = lines[-1]
    for prefix in ("vapoursynth.Error: ", "Error: "):
        last = last.removeprefix(prefix)
    return last[:300]


class _Filter:
    """One ``upscale()`` node: its producer, source and step."""

    def __init__(self, clip: vs.VideoNode, pipe: StreamDiffVSR, *, seed: int, warmup: int, reset: bool,
                 max_gap: int) -> None:
        self.clip, self.pipe, self.seed, self.reset = clip, pipe, seed, reset
        self.noise_shape = pipe.noise_shape(clip.height, clip.width)
        self.source = _ClipSource(clip, reset)
        out_bytes = 3 * (4 * clip.width) * (4 * clip.height) * clip.format.bytes_per_sample
        self.producer: OrderedProducer[vs.VideoFrame, vs.VideoFrame, _Carry] = OrderedProducer(
            self.step, cold=_Carry, max_gap=max_gap, warmup=warmup, reset_on_scene_change=reset,
            keep_delivered=max(2, min(2 * max_gap, (1 << 30) // out_bytes)), length=clip.num_frames)
        blank = clip.std.BlankClip(width=4 * clip.width, height=4 * clip.height, keep=True)
        self.template: vs.VideoFrame | None = None
        # one ModifyFrame node, never wrapped in FrameEval: VapourSynth runs one callback at a time
        self.node = blank.std.ModifyFrame(blank, self.select)

    def select(self, n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        if self.template is None:
            self.template = f  # a blank 4x frame to copy outputs into (all blank frames are equal)
        try:
            with python_stdout_to_stderr(), torch.inference_mode():
                return self.producer.get(n, self.source)
        except vs.Error:
            raise
        except Exception as exc:  # a source error, out of GPU memory, NaN...: one line naming the frame
            first = (str(exc).strip().splitlines() or [""])[0][:400]
            kind = "" if isinstance(exc, (SourceError, ValueError)) else f"{type(exc).__name__}: "
            raise vs.Error(f"upscale: frame {n}: {kind}{first}") from None

    def step(self, i: int, frame: vs.VideoFrame, peek_next: Callable[[], SourceFrame[vs.VideoFrame] | None],
             carry: _Carry) -> tuple[vs.VideoFrame, _Carry]:
        ahead = carry.ahead if carry.ahead is not None and carry.ahead.index == i else None
        lr = ahead.lr if ahead is not None else _source_tensor(i, frame, self.pipe.device)
        noise = ahead.noise if ahead is not None else frame_noise(self.seed, i, self.noise_shape)
        ready = self.pipe.inputs_ready()  # this frame's inputs exist: the flow ahead waits for nothing else
        made: list[_Ahead] = []

        def look_ahead() -> None:  # once frame i is queued on the GPU: RAFT overlaps its denoising
            nxt = peek_next()
            if not self.pipe.options.prefetch_flow or nxt is None or (self.reset and nxt.scene_cut):
                return
            try:  # on the host: copied to the GPU on the flow's side stream
                lr_next = _source_tensor(i + 1, nxt.payload, torch.device("cpu"))
                ticket = self.pipe.prefetch_flow(lr_next.x, lr.x, ready=ready, after=ahead.flow if ahead else None)
                made.append(_Ahead(i + 1, lr_next, frame_noise(self.seed, i + 1, self.noise_shape), ticket))
            except Exception:  # frame i + 1 computes it itself when its turn comes, and reports its own problem
                return

        hq, state = self.pipe.process_frame(lr, carry.state, noise=noise,
                                            flow=ahead.flow if ahead is not None and not carry.state.is_cold else None,
                                            on_enqueued=look_ahead)
        assert self.template is not None
        props = dict(frame.props)
        props["_FieldBased"] = 0
        return tensor_to_frame(hq, self.template, props), _Carry(state, made[0] if made else None)

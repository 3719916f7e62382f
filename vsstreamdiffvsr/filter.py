"""VapourSynth glue: ``vsstreamdiffvsr.upscale(clip, ...)``.

Frames <-> tensors, padding, props, validation with plain messages, one model per process, and one
:class:`~vsstreamdiffvsr.producer.OrderedProducer` per call that keeps the recurrence exact under
VapourSynth's parallel, out-of-order requests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import vapoursynth as vs

from .errors import NonFiniteInputError
from .options import DEFAULT_COMPILE_MODE, default_dtype, parse_device, parse_dtype
from .pipeline import MIN_LR_SIDE, FlowTicket, StreamDiffVSR
from .producer import OrderedProducer, SourceFrame, frame_noise
from .state import StreamState

__all__ = ["upscale", "get_pipeline"]

core = vs.core

_PIPES: dict[tuple[str, str, str], StreamDiffVSR] = {}
_PIPES_LOCK = threading.Lock()

_REDIRECT_LOCK = threading.Lock()
_redirect_depth = 0
_redirect_saved: Any = None


@contextlib.contextmanager
def _python_stdout_to_stderr() -> Iterator[None]:
    """``sys.stdout`` -> stderr while any frame callback runs (vspipe's y4m goes to stdout). Counted under a
    lock: ``contextlib.redirect_stdout`` swaps a process-wide attribute, and two upscale() nodes on two
    threads would restore each other's value (stdout left on stderr, or a print reaching the video)."""
    global _redirect_depth, _redirect_saved
    with _REDIRECT_LOCK:
        if _redirect_depth == 0:
            _redirect_saved, sys.stdout = sys.stdout, sys.stderr
        _redirect_depth += 1
    try:
        yield
    finally:
        with _REDIRECT_LOCK:
            _redirect_depth -= 1
            if _redirect_depth == 0:
                sys.stdout, _redirect_saved = _redirect_saved, None


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send anything written to fd 1 (vspipe's y4m stream) to stderr while loading models."""
    try:
        sys.stdout.flush() if sys.stdout is not None else None
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        with _python_stdout_to_stderr():
            yield
        return
    try:
        os.dup2(2, 1)
        with _python_stdout_to_stderr():  # the counted swap: a frame callback may be redirecting at once
            yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def get_pipeline(model_dir: str | os.PathLike[str] | None, device: torch.device, dtype: torch.dtype) -> StreamDiffVSR:
    """The process-wide pipeline for (model folder, device, dtype): loaded once, shared by every clip."""
    from .weights import resolve_model_dir

    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one GPU: one model
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(resolve_model_dir(model_dir)), str(device), str(dtype))
    with _PIPES_LOCK:
        pipe = _PIPES.get(key)
        if pipe is None:
            with _stdout_to_stderr():
                pipe = StreamDiffVSR.from_pretrained(key[0], device=device, dtype=dtype)
            _PIPES[key] = pipe
        return pipe


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
        fix = _FORMAT_FIX.get(fmt.color_family,
                              "convert first, e.g. core.resize.Point(clip, format=vs.RGBS)")
        raise vs.Error(f"upscale: only RGBS and RGBH clips are supported, got {fmt.name}; {fix}")
    if clip.width == 0 or clip.height == 0:
        raise vs.Error("upscale: clip must have a constant frame size; resize it to one size first")
    if clip.width < MIN_LR_SIDE or clip.height < MIN_LR_SIDE:
        raise vs.Error(f"upscale: clip must be at least {MIN_LR_SIDE}x{MIN_LR_SIDE} (RAFT needs "
                       f"{4 * MIN_LR_SIDE} px after x4), got {clip.width}x{clip.height}")


def _frame_to_tensor(frame: vs.VideoFrame, device: torch.device) -> torch.Tensor:
    # one small copy of the LR planes (source frames are read-only; rows may be padded)
    planes = np.stack([np.asarray(frame[p]) for p in range(3)])
    if not np.isfinite(planes).all():  # before the clamp below, which would turn +-Inf into 1 and 0
        raise NonFiniteInputError("the frame holds NaN or infinite values")
    x = torch.from_numpy(planes)[None]
    x = x.to(device=device, dtype=torch.float32, non_blocking=True)
    # RGB from YUV conversions overshoots slightly; the model was trained on [0, 1] images.
    return x.clamp_(0.0, 1.0)


def _tensor_to_frame(hq: torch.Tensor, blank: vs.VideoFrame, props: Any,
                     whole_rows: bool | None = None) -> vs.VideoFrame:
    """``hq`` (1, 3, H, W) written into a copy of ``blank`` (H x W). ``whole_rows``: copy padded rows whole
    (None = when ``hq`` is not on the CPU; from CPU memory the strided copy is direct, and padding costs one)."""
    out = blank.copy()
    # rounded to the output precision on the device, then copied from there straight into the frame's planes:
    # exactly the output's bytes cross to the host, and no host tensor is made in between. A fresh host
    # buffer per frame costs page faults on first touch: on our CPU, making and filling 25 MB (one 1080p RGBS
    # frame) took 4.9 ms against 1.5 ms for copying into memory already in use, 21 against 5.6 ms at 4K.
    size = blank.format.bytes_per_sample
    dtype = torch.float16 if size == 2 else torch.float32
    data = hq[0].to(dtype=dtype)
    planes = [np.asarray(out[p]) for p in range(3)]  # writable views of the planes (rows may be padded)
    if whole_rows is None:
        whole_rows = hq.device.type != "cpu"
    height, width = planes[0].shape
    row = planes[0].strides[0] // size  # samples from one row's start to the next
    if whole_rows and row != width and all(a.strides == (row * size, size) for a in planes):
        # Rows padded to VapourSynth's alignment (widths such as 4 x 854): a device-to-host copy into such a
        # strided view goes through a fresh contiguous host temporary and then a strided host copy. Pad the
        # rows on the device instead and copy them, padding included, straight into the plane's memory; the
        # last row alone, whose padding the API does not promise, is copied without it. The host side, timed on
        # our CPU with a host copy standing in for the transfer: 6.3 against 3.1 ms per 3416x1920 RGBS frame
        # (an 854x480 source), 1.1 against 0.4 ms at 1708x960.
        data = F.pad(data, (0, row - width))
        for p, a in enumerate(planes):
            rows = np.lib.stride_tricks.as_strided(a, shape=(height - 1, row), strides=a.strides)
            torch.from_numpy(rows).copy_(data[p, : height - 1])
            torch.from_numpy(a[height - 1]).copy_(data[p, height - 1, :width])
    else:
        for p, a in enumerate(planes):
            torch.from_numpy(a).copy_(data[p])
    out.props.clear()
    out.props.update(props)
    with contextlib.suppress(KeyError):
        del out.props["_Alpha"]  # the source's alpha plane is LR and not upscaled: it does not fit this frame
    return out


def upscale(clip: vs.VideoNode, *, model_dir: str | os.PathLike[str] | None = None, device: str = "cuda",
            dtype: torch.dtype | str | None = None, seed: int = 0, max_gap: int = 16, warmup: int = 0,
            reset_on_scene_change: bool = True, flow: str = "hr", tile: int | tuple[int, int] | None = None,
            tile_overlap: int = 16, compile: bool = False, compile_mode: str = DEFAULT_COMPILE_MODE,
            prefetch_flow: bool = True, raft_corr: str = "auto", graph_flow: bool | None = None,
            compile_flow: bool | None = None, tile_denoise: bool = False,
            raft_dtype: str | None = None) -> vs.VideoNode:
    """Stream-DiffVSR x4 super-resolution of an RGBS/RGBH clip.

    Args:
        clip: constant-format, constant-size RGBS or RGBH, at least 32x32; values are clamped to [0, 1].
            Sizes that are not multiples of 4 are padded (edge replicate) and the output cropped back.
        model_dir: the model folder (default ``$VSSTREAMDIFFVSR_MODEL_DIR`` or the per-user cache;
            fill it with ``python -m vsstreamdiffvsr download``).
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        dtype: U-Net/ControlNet precision; None = float16 on CUDA, float32 elsewhere.
        seed: noise seed; frame n's noise is a pure function of (seed, n).
        max_gap: requests up to this many frames ahead of the last produced frame are caught up
            exactly; keep it >= vspipe's ``-r`` and ``core.num_threads``.
        warmup: frames computed and discarded before a seek target.
        reset_on_scene_change: a frame with ``_SceneChangePrev`` = 1 starts a new run.
        flow: ``"hr"`` (reference: RAFT on the bicubic x4 frames) or ``"lr"`` (faster, a documented
            deviation: RAFT at LR, flow upsampled x4; needs an LR side of at least 128 px).
        tile: LR tile size (int or (h, w), multiples of 8) for large frames: the stages at HR size (ARTG's
            embedding, TPM encoder, decoder) run per tile with a margin of context cropped away (the untiled
            values for tile sides of 128 or more), the denoising on the whole LR latent; None = whole
            frames, with automatic tiling on CUDA out-of-memory (then the denoising too, if it alone does
            not fit).
        tile_overlap: LR pixels shared by neighbouring denoising tiles (multiple of 4, at most half a tile).
        tile_denoise: with ``tile`` (required), also denoise per tile (feathered): less memory, a moved
            picture.
        compile: ``torch.compile`` the denoising step and decoder (first frames slow; kernels cached on disk).
        compile_mode: ``"reduce-overhead"`` (CUDA graphs, the default), ``"default"`` or ``"max-autotune"``.
        prefetch_flow: compute frame n+1's optical flow (it depends on the inputs only) while frame n is
            denoised, on a side CUDA stream; the output is the same either way.
        raft_corr: RAFT's correlation volume: ``"auto"`` (the reference's float32 pyramid up to 720p output,
            stored in float16 up to 1080p, none above), ``"full"``, ``"half"`` or ``"lean"`` (see
            :meth:`StreamDiffVSR.from_pretrained`).
        graph_flow: replay the flow computed ahead from a CUDA graph recorded once per clip size (the same
            numbers; the host no longer launches RAFT's kernels). None = off: no gain measured on an H100.
        compile_flow: also ``torch.compile`` RAFT; None = with ``compile`` on CUDA (see
            :meth:`StreamDiffVSR.from_pretrained`).
        raft_dtype: precision of RAFT's networks: ``"float32"`` (the reference), ``"float16"`` (RAFT's own mixed
            precision: correlation and flow coordinates stay float32; on the CPU half-precision convolutions
            are far slower), ``"bfloat16"``, or None / ``"auto"``: float16 from 1080p output (with
            ``flow="hr"``: RAFT's input past 720p) on CUDA with a float16 ``dtype`` (the CUDA default), float32
            otherwise (on an H100 at 1080p: 191.3 ms per frame against 200.4 with float32; see the README).

    Returns:
        The same format at exactly 4x width and height; each frame carries its own source frame's props.

    Rules (frame n): output n is the pipeline run over frames s..n, where s is the start of the current
    run: frame 0, the last scene cut, or a seek point. Playing forward (any thread count, any
    ``vspipe -r`` up to ``max_gap``) therefore gives the same bytes as one uninterrupted run. A request
    behind the last produced frame, or more than ``max_gap`` ahead, is a seek: the recurrence restarts
    cold at n (as frame 0 does), after ``warmup`` frames, so the picture right after a seek lacks the
    temporal detail built up by the previous frames and differs from an uninterrupted run. For
    reproducible chunked encodes, trim in the script (``clip[a:b]``: the chunk's first frame is its
    natural start) or cut at scene changes (``_SceneChangePrev``), which are pure functions of n.
    """
    _check_clip(clip)
    for name, value, lo in (("max_gap", max_gap, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise vs.Error(f"upscale: {name} must be an integer >= {lo}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise vs.Error(f"upscale: seed must be an integer, got {seed!r}")
    for name, flag in (("tile_denoise", tile_denoise), ("compile", compile), ("prefetch_flow", prefetch_flow),
                       ("reset_on_scene_change", reset_on_scene_change)):
        if not isinstance(flag, bool):  # "0" from a vspipe -a argument is truthy
            raise vs.Error(f"upscale: {name} must be True or False, got {flag!r}")
    for name, flag in (("graph_flow", graph_flow), ("compile_flow", compile_flow)):
        if flag is not None and not isinstance(flag, bool):
            raise vs.Error(f"upscale: {name} must be None, True or False, got {flag!r}")
    try:
        dev = parse_device(device)
        dt = parse_dtype(dtype if dtype is not None else default_dtype(dev))
    except ValueError as exc:
        raise vs.Error(f"upscale: {exc}") from None
    try:
        base = get_pipeline(model_dir, dev, dt)
    except Exception as exc:  # ModelFilesError and friends: one clear line
        raise vs.Error(f"upscale: {exc}") from None
    try:
        pipe = base.with_options(flow=flow, tile=tile, tile_overlap=tile_overlap, compile=compile,
                                 compile_mode=compile_mode, raft_corr=raft_corr, graph_flow=graph_flow,
                                 compile_flow=compile_flow, tile_denoise=tile_denoise, raft_dtype=raft_dtype)
    except ValueError as exc:
        raise vs.Error(f"upscale: {exc}") from None
    if flow == "lr" and min(clip.width, clip.height) < 128:
        raise vs.Error(f'upscale: flow="lr" needs a clip of at least 128x128, got {clip.width}x{clip.height}; '
                       'use flow="hr"')

    if core.num_threads > max_gap:
        warnings.warn(f"upscale: core.num_threads ({core.num_threads}) > max_gap ({max_gap}): parallel requests "
                      "may arrive further ahead than max_gap and be treated as seeks; raise max_gap", stacklevel=2)

    w, h = clip.width, clip.height
    pw, ph = -w % 4, -h % 4
    lat_shape = (1, pipe.latent_channels, (h + ph), (w + pw))
    window = max(0, min(max_gap, clip.num_frames - 1))

    template: list[vs.VideoFrame] = []  # a blank 4x frame to copy outputs into (all blank frames are equal)
    peek: list[Callable[[int], vs.VideoFrame | None]] = []  # source frames available to the current request
    # the next frame, converted once, its flow computed ahead and its noise drawn ahead (pure functions of the
    # input and of (seed, n))
    ahead_lq: dict[int, tuple[torch.Tensor, FlowTicket, torch.Tensor]] = {}
    last = clip.num_frames - 1

    def lq_tensor(frame: vs.VideoFrame) -> torch.Tensor:
        x = _frame_to_tensor(frame, dev)
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if (pw or ph) else x

    def step(i: int, frame: vs.VideoFrame, state: StreamState) -> tuple[vs.VideoFrame, StreamState]:
        try:
            return run_step(i, frame, state)
        except NonFiniteInputError:
            raise vs.Error(f"upscale: source frame {i} contains NaN or infinite values; fix the source "
                           "(e.g. replace them with std.Expr) before upscaling") from None
        except vs.Error:
            raise
        except ValueError as exc:
            raise vs.Error(f"upscale: frame {i}: {exc}") from None
        except Exception as exc:  # out of GPU memory, a CUDA error...: one line naming the frame
            first = (str(exc).strip().splitlines() or [""])[0][:400]
            raise vs.Error(f"upscale: frame {i}: {type(exc).__name__}: {first}") from None

    def run_step(i: int, frame: vs.VideoFrame, state: StreamState) -> tuple[vs.VideoFrame, StreamState]:
        prepared = ahead_lq.pop(i, None)
        ahead_lq.clear()
        x, ticket, noise = prepared if prepared is not None else (lq_tensor(frame), None, None)
        queue_next = None
        if prefetch_flow and i < last:
            nxt = peek[0](i + 1)
            if nxt is not None and not (reset_on_scene_change and nxt.props.get("_SceneChangePrev", 0)):
                try:
                    x_next: torch.Tensor | None = lq_tensor(nxt)
                except NonFiniteInputError:
                    x_next = None  # frame i + 1 reports it when its turn comes, not frame i
                if x_next is not None:
                    ready = pipe.inputs_ready()

                    def queue_next() -> None:  # once frame i is queued on the GPU: RAFT overlaps its denoising,
                        # and the host draws frame i + 1's noise meanwhile (1.8 ms at 1080p, 5.6 ms at 4K on our
                        # CPU) rather than while the GPU waits for frame i + 1
                        flow_next = pipe.prefetch_flow(x_next, x, ready=ready, after=ticket)
                        ahead_lq[i + 1] = (x_next, flow_next, frame_noise(seed, i + 1, lat_shape))
        if noise is None:
            noise = frame_noise(seed, i, lat_shape)
        hq, state = pipe.process_frame(x, state, noise=noise,
                                       flow=None if state.is_cold else ticket, on_enqueued=queue_next)
        return _tensor_to_frame(hq[..., : 4 * h, : 4 * w], template[0], frame.props), state

    # delivered output frames kept for repeated requests: up to 2 * max_gap, within ~1 GiB (a 4K RGBS frame
    # is 100 MB), at least 2
    out_bytes = 3 * (4 * w) * (4 * h) * clip.format.bytes_per_sample
    producer: OrderedProducer[vs.VideoFrame, vs.VideoFrame] = OrderedProducer(
        step, max_gap=max_gap, warmup=warmup, reset_on_scene_change=reset_on_scene_change,
        keep_delivered=max(2, min(2 * max_gap, (1 << 30) // out_bytes)))
    # shifted[k][n] == clip[n - k]: the frames a catch-up needs arrive with the request (no blocking fetch);
    # ahead[n] == clip[n + 1] lets frame n + 1's flow start while frame n denoises
    shifted = [clip] + [core.std.Splice([clip[0] * k, clip[:-k]]) for k in range(1, window + 1)]
    ahead = core.std.Splice([clip[1:], clip[-1]]) if clip.num_frames > 1 else clip
    blank_clip = clip.std.BlankClip(width=4 * w, height=4 * h, keep=True)

    def selector(n: int, f: list[vs.VideoFrame]) -> vs.VideoFrame:
        def source(i: int) -> vs.VideoFrame | None:
            k = n - i
            if 0 <= k <= window:
                return f[k]
            return f[-2] if i == n + 1 else None

        def fetch(i: int) -> SourceFrame[vs.VideoFrame]:
            frame = source(i)
            if frame is None:
                frame = clip.get_frame(i)
            return SourceFrame(frame, scene_cut=bool(frame.props.get("_SceneChangePrev", 0)))

        if not template:
            template.append(f[-1])
        peek[:] = [source]
        with _python_stdout_to_stderr(), torch.inference_mode():
            return producer.get(n, fetch)

    # One ModifyFrame node, never wrapped in FrameEval: VapourSynth then runs one callback at a time.
    return blank_clip.std.ModifyFrame([*shifted, ahead, blank_clip], selector)

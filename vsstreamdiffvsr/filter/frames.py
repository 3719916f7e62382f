"""VapourSynth frames <-> tensors, and stdout kept clean (vspipe writes the video there)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import vapoursynth as vs

from ..pipeline.inputs import LRFrame, from_planes

__all__ = ["frame_to_lr", "tensor_to_frame", "stdout_to_stderr", "python_stdout_to_stderr"]


def frame_to_lr(frame: vs.VideoFrame, device: torch.device) -> LRFrame:
    """An RGBS/RGBH frame as the pipeline's checked, clamped, padded LR input (one small host copy: source frames
    are read-only and rows may be padded)."""
    return from_planes(np.stack([np.asarray(frame[p]) for p in range(3)]), device)


def tensor_to_frame(hq: torch.Tensor, blank: vs.VideoFrame, props: Any, whole_rows: bool | None = None
                    ) -> vs.VideoFrame:
    """``hq`` (1, 3, H, W) written into a copy of ``blank`` (H x W) with ``props``. ``whole_rows``: copy padded rows
    whole (None = when ``hq`` is not on the CPU; from CPU memory the strided copy is direct, and padding costs one).

    The output is rounded to the frame's precision on the device and copied from there straight into the
    frame's planes: no host tensor in between (a fresh host buffer per frame costs page faults; docs/performance.md).
    """
    out = blank.copy()
    size = blank.format.bytes_per_sample
    data = hq[0].to(dtype=torch.float16 if size == 2 else torch.float32)
    planes = [np.asarray(out[p]) for p in range(3)]  # writable views of the planes (rows may be padded)
    if whole_rows is None:
        whole_rows = hq.device.type != "cpu"
    height, width = planes[0].shape
    row = planes[0].strides[0] // size  # samples from one row's start to the next
    if whole_rows and row != width and all(a.strides == (row * size, size) for a in planes):
        # rows padded to VapourSynth's alignment: a device-to-host copy into a strided view goes through a host
        # temporary; pad the rows on the device and copy them whole, the last row (whose padding the API does not
        # promise) without its padding
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


_REDIRECT_LOCK = threading.Lock()
_redirect_depth = 0
_redirect_saved: Any = None


@contextlib.contextmanager
def python_stdout_to_stderr() -> Iterator[None]:
    """``sys.stdout`` -> stderr while any frame callback runs. Counted under a lock: two upscale() nodes on two
    threads would otherwise restore each other's value (stdout left on stderr, or a print reaching the video)."""
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
def stdout_to_stderr() -> Iterator[None]:
    """Send anything written to fd 1 (vspipe's y4m stream) to stderr while loading models."""
    try:
        sys.stdout.flush() if sys.stdout is not None else None
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        with python_stdout_to_stderr():
            yield
        return
    try:
        os.dup2(2, 1)
        with python_stdout_to_stderr():  # the counted swap: a frame callback may be redirecting at once
            yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)

"""Deterministic VapourSynth source clips for the filter tests, and the pipeline-side expectation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import vapoursynth as vs

from vsstreamdiffvsr import StreamDiffVSR, StreamState
from vsstreamdiffvsr import frame_noise

core = vs.core


def source_array(n: int, height: int, width: int) -> np.ndarray:
    """(3, h, w) float32 content of frame n: a moving smooth pattern plus seeded grain, partly outside [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.45 * np.sin((xx + 1.5 * n) / 5.0)[None] * np.cos((yy - n) / 7.0)[None]
    grain = np.random.default_rng(n).random((3, height, width), dtype=np.float32) * 0.2 - 0.1
    arr = base + grain * np.array([1.0, 0.7, 0.4], dtype=np.float32)[:, None, None]
    arr[0, 0, 0] = 1.05  # slight overshoot, as after a YUV -> RGB conversion: the filter clamps
    return arr.astype(np.float32)


def make_source(width: int, height: int, length: int, *, fmt: int = vs.RGBS, cuts: Iterable[int] = ()) -> vs.VideoNode:
    """RGBS/RGBH clip with content :func:`source_array`, prop ``SrcIndex`` = n, and scene cuts at ``cuts``."""
    cut_set = set(cuts)
    blank = core.std.BlankClip(format=fmt, width=width, height=height, length=length, fpsnum=24, fpsden=1)
    np_dtype = np.float16 if fmt == vs.RGBH else np.float32

    def fill(n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        out = f.copy()
        arr = source_array(n, height, width).astype(np_dtype)
        for p in range(3):
            np.copyto(np.asarray(out[p]), arr[p])
        out.props["SrcIndex"] = n
        out.props["_SceneChangePrev"] = int(n in cut_set)
        return out

    return blank.std.ModifyFrame(blank, fill)


def frame_tensor(clip: vs.VideoNode, n: int) -> torch.Tensor:
    f = clip.get_frame(n)
    return torch.stack([torch.from_numpy(np.array(f[p], dtype=np.float32)) for p in range(3)])[None]


def expected_run(pipe: StreamDiffVSR, clip: vs.VideoNode, frames: Sequence[int], seed: int = 0) -> list[torch.Tensor]:
    """The pipeline run over ``frames`` (one run, cold at the first), as the filter should compute it."""
    h, w = clip.height, clip.width
    ph, pw = -h % 4, -w % 4
    state = StreamState()
    outs = []
    for i in frames:
        x = frame_tensor(clip, i).clamp(0, 1)
        x = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        hq, state = pipe.process_frame(x, state, noise=frame_noise(seed, i, (1, 4, h + ph, w + pw)))
        outs.append(hq[..., : 4 * h, : 4 * w])
    return outs

"""Scene cuts: PySceneDetect's content detector run over the clip that is upscaled, and the same cut list marked
on a clip for ``.vpy`` users, so that ``vspipe`` and ``vsstreamdiffvsr encode`` agree frame for frame.

The detector sees the clip after the source's conversion to RGB (or after the user's script), made 8-bit and at
most 256 px wide by VapourSynth (PySceneDetect's own default working width), through a small
:class:`scenedetect.VideoStream` adapter: one decoder, one cut list, whatever the input is. A film is detected in
segments of :data:`SEGMENT` frames at once on the CPU's cores (the detection is the one serial step before the
GPUs start).

    clip = vsstreamdiffvsr.encode.mark_scene_cuts(clip, vsstreamdiffvsr.encode.detect_scene_cuts(clip))
    # or the cuts an encode used: mark_scene_cuts(clip, "film-4x.mkv.work")
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["detect_scene_cuts", "mark_scene_cuts", "load_cuts", "DEFAULT_THRESHOLD", "DEFAULT_MIN_SCENE_LEN",
           "DETECT_WIDTH", "SEGMENT"]

#: PySceneDetect's ContentDetector defaults
DEFAULT_THRESHOLD = 27.0
DEFAULT_MIN_SCENE_LEN = 15
#: frames wider than this are scaled down before detection (PySceneDetect's default working width)
DETECT_WIDTH = 256
#: detection runs in segments of this many frames (in parallel), each with a lead-in from the one before
SEGMENT = 4800


def _detect_clip(clip: Any) -> Any:
    """``clip`` as 8-bit RGB at most :data:`DETECT_WIDTH` wide (bilinear, no dithering)."""
    import vapoursynth as vs

    width, height = clip.width, clip.height
    if width > DETECT_WIDTH:
        width, height = DETECT_WIDTH, max(2, round(height * DETECT_WIDTH / width / 2) * 2)
    kwargs: dict[str, Any] = {}
    if clip.format.color_family == vs.YUV:
        kwargs["matrix_in"] = 1  # only for detection: a cut is a cut in any matrix
    return clip.resize.Bilinear(width=width, height=height, format=vs.RGB24, dither_type="none", **kwargs)


def _stream_class() -> type:
    from scenedetect import FrameTimecode, VideoStream
    from scenedetect.video_stream import SeekError

    class ClipStream(VideoStream):  # type: ignore[misc]
        """A VapourSynth clip as PySceneDetect's video stream (BGR frames, read ahead in VapourSynth's threads)."""

        BACKEND_NAME = "vapoursynth"

        def __init__(self, clip: Any, name: str, on_frame: Callable[[int], None] | None) -> None:
            self._clip = _detect_clip(clip)
            self._name = name
            self._next = 0
            self._ahead: dict[int, Any] = {}
            self._on_frame = on_frame
            self._rate = Fraction(clip.fps.numerator, clip.fps.denominator)

        path = property(lambda self: self._name)
        name = property(lambda self: self._name)
        is_seekable = property(lambda self: False)
        frame_rate = property(lambda self: self._rate)
        duration = property(lambda self: FrameTimecode(self._clip.num_frames, self._rate))
        frame_size = property(lambda self: (self._clip.width, self._clip.height))
        aspect_ratio = property(lambda self: 1.0)
        position = property(lambda self: FrameTimecode(max(0, self._next - 1), self._rate))
        position_ms = property(lambda self: 1000.0 * max(0, self._next - 1) / float(self._rate))
        frame_number = property(lambda self: self._next)

        def read(self, decode: bool = True) -> np.ndarray | bool:
            n = self._next
            if n >= self._clip.num_frames:
                return False
            for k in range(n, min(n + 8, self._clip.num_frames)):
                if k not in self._ahead:
                    self._ahead[k] = self._clip.get_frame_async(k)
            frame = self._ahead.pop(n).result()
            self._next += 1
            if self._on_frame is not None:
                self._on_frame(self._next)
            if not decode:
                return True
            return np.ascontiguousarray(np.stack([np.asarray(frame[p]) for p in (2, 1, 0)], axis=-1))

        def reset(self) -> None:
            self._next, self._ahead = 0, {}

        def seek(self, target: Any) -> None:
            raise SeekError("a VapourSynth clip is read in order for detection")

    return ClipStream


def detect_scene_cuts(clip: Any, threshold: float = DEFAULT_THRESHOLD, min_scene_len: int = DEFAULT_MIN_SCENE_LEN,
                      on_frame: Callable[[int], None] | None = None, *, segment: int = SEGMENT,
                      jobs: int | None = None) -> list[int]:
    """The frames that start a new scene (never 0), by PySceneDetect's ContentDetector over ``clip`` (any
    VapourSynth clip of constant format). ``on_frame(frames_read)`` is called as detection goes (progress).

    The clip is cut into segments of ``segment`` frames, each detected on its own (``jobs`` at once; default:
    half the CPU cores, at most 8) after a lead-in of ``2 * min_scene_len`` frames from the segment before, and
    keeps the cuts inside it. The segments depend on the clip's length only, so the cut list is the same for any
    ``jobs``. Raises ValueError for a threshold <= 0, min_scene_len < 1 or segment < 1."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if not isinstance(min_scene_len, int) or min_scene_len < 1:
        raise ValueError(f"min_scene_len must be an integer >= 1 (frames), got {min_scene_len!r}")
    if segment < 1:
        raise ValueError(f"segment must be >= 1 frames, got {segment!r}")
    total = clip.num_frames
    lead = 2 * min_scene_len
    read = [0]
    lock = threading.Lock()

    def counted(n: int) -> None:
        if on_frame is not None:
            with lock:
                read[0] += 1
                on_frame(read[0])

    def one(start: int) -> list[int]:
        first = max(0, start - lead)
        part = clip[first:min(total, start + segment)]
        cuts = _detect_one(part, threshold, min_scene_len, counted)
        return [first + c for c in cuts if first + c >= start and first + c > 0]

    starts = list(range(0, total, segment))
    workers = max(1, min(len(starts), jobs or min(8, max(1, (os.cpu_count() or 2) // 2))))
    with ThreadPoolExecutor(workers, thread_name_prefix="vsstreamdiffvsr-scenes") as pool:
        found = [c for cuts in pool.map(one, starts) for c in cuts]
    return sorted(set(found))


def _detect_one(clip: Any, threshold: float, min_scene_len: int, on_frame: Callable[[int], None] | None) -> list[int]:
    from scenedetect import ContentDetector, SceneManager

    manager = SceneManager()
    manager.auto_downscale = False  # the clip is already at the working width
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_scene_len))
    manager.detect_scenes(video=_stream_class()(clip, "clip", on_frame))
    scenes = manager.get_scene_list(start_in_scene=True)
    return sorted({int(start.frame_num) for start, _end in scenes} - {0})


def load_cuts(where: str | os.PathLike[str]) -> list[int]:
    """The cut list of an encode: ``where`` is its work folder, its ``plan.json`` or a text file with one frame
    number per line. Raises ValueError naming the file when it holds no cut list."""
    path = Path(where)
    if path.is_dir():
        path = path / "plan.json"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read a cut list from {path} ({exc.strerror})") from None
    if path.suffix == ".json":
        try:
            return [int(c) for c in json.loads(text)["cuts"]]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} holds no cut list (not a plan.json of vsstreamdiffvsr encode)") from None
    try:
        return [int(line) for line in text.split() if line]
    except ValueError:
        raise ValueError(f"{path} must hold one frame number per line") from None


def mark_scene_cuts(clip: Any, cuts: Iterable[int] | str | os.PathLike[str]) -> Any:
    """``clip`` with ``_SceneChangePrev`` = 1 on the frames of ``cuts`` and 0 on every other frame (and
    ``_SceneChangeNext`` to match), so that ``vsstreamdiffvsr.upscale`` restarts exactly where an encode does.

    ``cuts``: frame numbers, or the work folder / ``plan.json`` / text file of an encode (:func:`load_cuts`)."""
    import vapoursynth as vs

    if isinstance(cuts, (str, os.PathLike)):
        cuts = load_cuts(cuts)
    marks = {int(c) for c in cuts}
    if not isinstance(clip, vs.VideoNode):
        raise vs.Error("mark_scene_cuts: clip must be a vs.VideoNode")

    def mark(n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        out = f.copy()
        out.props["_SceneChangePrev"] = int(n in marks)
        out.props["_SceneChangeNext"] = int(n + 1 in marks)
        return out

    return clip.std.ModifyFrame(clip, mark)

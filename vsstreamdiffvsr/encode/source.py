"""The clip to upscale: a video file (decoded as ``scripts/upscale.vpy`` does) or a ``.vpy`` script, probed and
checked up front, and read in batches of RGB planes.

* A video file is probed with ffprobe (a video stream, progressive, a constant frame rate) and decoded with
  bestsource; YUV becomes RGBS with the matrix of its ``_Matrix`` prop (BT.709 when unspecified), RGB is taken as
  it is. The encoded output uses that matrix (BT.709 for an RGB source).
* A ``.vpy`` script's output 0 is the clip: RGBS/RGBH as it is, YUV converted as for a file.

Every problem is an :class:`~vsstreamdiffvsr.encode.errors.EncodeError` with one line naming it and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import statistics
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EncodeError
from .mux import tool

__all__ = ["SourceInfo", "FrameBatch", "FrameReader", "probe_input", "open_clip", "to_rgb", "source_identity",
           "INTERLACED_FIX", "MIN_SIDE", "MAX_SIDE"]

#: LR sides the pipeline accepts (it pads to multiples of 4 itself)
MIN_SIDE, MAX_SIDE = 32, 4096

INTERLACED_FIX = ("write a .vpy that deinterlaces it (e.g. core.bwdif.Bwdif(clip, field=1) or QTGMC) and pass the "
                  ".vpy as INPUT with --streams-from FILE for the audio")

#: H.273 code -> ffmpeg name, for the colour tags of the output (2 = unspecified: no tag)
MATRIX_NAMES = {0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "ycgco",
                9: "bt2020nc", 10: "bt2020c", 12: "chroma-derived-nc", 13: "chroma-derived-c", 14: "ictcp"}
PRIMARIES_NAMES = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film", 9: "bt2020",
                   10: "smpte428", 11: "smpte431", 12: "smpte432", 22: "jedec-p22"}
TRANSFER_NAMES = {1: "bt709", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear", 9: "log100",
                  10: "log316", 11: "iec61966-2-4", 12: "bt1361e", 13: "iec61966-2-1", 14: "bt2020-10",
                  15: "bt2020-12", 16: "smpte2084", 17: "smpte428", 18: "arib-std-b67"}


@dataclass(frozen=True)
class SourceInfo:
    """What the encode needs to know about its input, all plain values (it travels to workers and into the plan).

    ``fps`` is (num, den) frames per second; ``matrix`` the H.273 matrix the output is encoded with; ``primaries``
    and ``transfer`` the source's (2 = unspecified); ``sar`` the sample aspect ratio (num, den); ``video_start`` the
    source video stream's first timestamp in seconds (the audio is kept in step with it); ``streams_from`` the file
    whose audio, subtitles, chapters and metadata are copied (None: none)."""

    path: str
    kind: str  # "file" or "vpy"
    width: int
    height: int
    num_frames: int
    fps: tuple[int, int]
    sample: str  # "float32" or "float16"
    matrix: int
    primaries: int = 2
    transfer: int = 2
    sar: tuple[int, int] = (1, 1)
    video_start: float = 0.0
    streams_from: str | None = None
    probe: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class FrameBatch:
    """Consecutive source frames: ``planes`` (n, 3, h, w) float32/float16 RGB; ``props`` each frame's props
    (plain values only), which the output frames carry as the filter's do. ``error``: why frame ``start + n``
    cannot be used (the batch stops before it), raised as a ChunkError when that frame's turn comes."""

    start: int
    planes: np.ndarray
    props: list[dict[str, Any]]
    error: str | None = None


def _run_ffprobe(args: list[str], path: Path, what: str) -> str:
    cmd = [tool("ffprobe"), "-v", "error", *args, str(path)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EncodeError(f"ffprobe took over 10 minutes to {what} {path}; is it a regular video file?") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no reason given"])[-1][:300]
        raise EncodeError(f"cannot read {path} as a video (ffprobe: {last}); check that it is a complete video file")
    return res.stdout


def probe_input(path: Path, check_rate: bool = True) -> dict[str, Any]:
    """ffprobe's view of a video file (streams, format, chapters), after the checks that need no decoding: it
    exists, can be read, has a video stream, is progressive and (``check_rate``) has a constant frame rate."""
    if not path.exists():
        raise EncodeError(f"input {path} does not exist")
    if not path.is_file():
        raise EncodeError(f"input {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise EncodeError(f"cannot read input {path} ({exc.strerror}); check its permissions") from None
    info = json.loads(_run_ffprobe(["-show_streams", "-show_format", "-show_chapters", "-of", "json"], path, "probe")
                      or "{}")
    video = [s for s in info.get("streams", []) if s.get("codec_type") == "video"
             and not s.get("disposition", {}).get("attached_pic")]
    if not video:
        raise EncodeError(f"input {path} has no video stream (only {_kinds(info) or 'nothing ffprobe knows'})")
    vs_ = video[0]
    order = str(vs_.get("field_order", "progressive"))
    if order in ("tt", "bb", "tb", "bt"):
        raise EncodeError(f"input {path} is interlaced (field order {order}); {INTERLACED_FIX}")
    if check_rate:
        _check_constant_rate(path, vs_)
    return info


def _kinds(info: Mapping[str, Any]) -> str:
    kinds = sorted({str(s.get("codec_type")) for s in info.get("streams", [])})
    return ", ".join(f"{k} streams" for k in kinds)


def _check_constant_rate(path: Path, stream: Mapping[str, Any]) -> None:
    """Refuse a variable frame rate: frame n of the output is shown for 1/fps, so the audio would drift."""
    index = int(stream.get("index", 0))
    out = _run_ffprobe(["-select_streams", str(index), "-show_entries", "packet=pts", "-of", "csv=p=0"], path,
                       "read the timestamps of")
    pts = sorted(int(t) for t in (line.strip().rstrip(",") for line in out.splitlines()) if t.lstrip("-").isdigit())
    if len(pts) < 3:
        return
    diffs = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    if not diffs:
        return
    step = statistics.median(diffs)
    tb = Fraction(str(stream.get("time_base", "1/1000")))
    tol = max(1.5, 0.01 * step)  # timestamps rounded to the container's tick (1 ms in Matroska)
    odd = sum(1 for d in diffs if abs(d - step) > tol)
    if odd > max(2, len(diffs) // 1000):
        rate = Fraction(str(stream.get("r_frame_rate", "0/1")))
        guess = f"{rate.numerator}/{rate.denominator}" if rate > 0 else f"{round(1 / float(step * tb), 3)}"
        raise EncodeError(f"input {path} has a variable frame rate ({odd} of {len(diffs)} frame durations differ "
                          f"from {float(step * tb) * 1000:.2f} ms); pass --fps {guess} to convert it to a constant "
                          "rate (frames repeated or dropped by their timestamps), or make it constant in a .vpy")


def open_clip(path: Path, kind: str, fps: tuple[int, int] | None = None) -> tuple[Any, int]:
    """The clip to upscale as RGBS/RGBH and the matrix its output is encoded with (H.273 code).

    A file is decoded with bestsource (``fps``: converted to that constant rate by timestamps); a ``.vpy`` is run
    and its output 0 taken. Raises EncodeError for a file bestsource cannot open or a script that fails."""
    import vapoursynth as vs

    core = vs.core
    if kind == "vpy":
        clip = _run_script(path)
    else:
        if not hasattr(core, "bs"):
            raise EncodeError("the bestsource plugin is missing: pip install vapoursynth-bestsource")
        kwargs: dict[str, Any] = {"fpsnum": fps[0], "fpsden": fps[1]} if fps else {}
        try:
            clip = core.bs.VideoSource(source=str(path), **kwargs)
        except vs.Error as exc:
            raise EncodeError(f"bestsource cannot decode {path}: {_last_line(exc)}") from None
    return to_rgb(clip, str(path))


def _run_script(path: Path) -> Any:
    import vapoursynth as vs

    vs.clear_outputs()
    try:
        runpy.run_path(str(path), run_name="__vapoursynth__")
    except Exception as exc:
        raise EncodeError(f"the script {path} failed: {type(exc).__name__}: {_last_line(exc)}") from None
    outputs = vs.get_outputs()
    if 0 not in outputs:
        raise EncodeError(f"the script {path} sets no output 0; end it with clip.set_output()")
    out = outputs[0]
    clip = getattr(out, "clip", out)
    if not isinstance(clip, vs.VideoNode):
        raise EncodeError(f"output 0 of {path} is not a video clip")
    return clip


def to_rgb(clip: Any, name: str) -> tuple[Any, int]:
    """``clip`` as RGBS (or RGBH as it is) and the output matrix: the conversion of ``scripts/upscale.vpy``.

    YUV is converted with the matrix of frame 0's ``_Matrix`` prop (range from the props); an unspecified,
    reserved or RGB matrix becomes BT.709 for the output. Raises EncodeError for a clip of no constant format,
    size or frame rate, or sides outside 32..4096."""
    import vapoursynth as vs

    core = vs.core
    fmt = clip.format
    if fmt is None or clip.width == 0 or clip.height == 0:
        raise EncodeError(f"{name}: the clip has no constant format and size; resize it to one format first")
    if clip.fps.numerator <= 0:
        raise EncodeError(f"{name}: the clip has no constant frame rate; set one with core.std.AssumeFPS")
    if not (MIN_SIDE <= clip.width <= MAX_SIDE and MIN_SIDE <= clip.height <= MAX_SIDE):
        raise EncodeError(f"{name}: the picture is {clip.width}x{clip.height}; sides of {MIN_SIDE} to {MAX_SIDE} px "
                          "are upscaled (resize or crop it in a .vpy)")
    if fmt.color_family == vs.GRAY:
        raise EncodeError(f"{name}: a grey clip; make it RGB or YUV first")
    try:
        props = clip.get_frame(0).props
    except vs.Error as exc:
        raise EncodeError(f"{name}: frame 0 cannot be decoded: {_last_line(exc)}") from None
    matrix = int(props.get("_Matrix", 2))
    if fmt.color_family == vs.RGB or matrix in (0, 2, 3):
        matrix = 1  # an RGB source, or unspecified/reserved: the x4 output is HD, encode it as BT.709
    if fmt.id in (vs.RGBS, vs.RGBH):
        rgb = clip
    elif fmt.color_family == vs.RGB:
        rgb = core.resize.Point(clip, format=vs.RGBS)
    else:
        rgb = core.resize.Bicubic(clip, format=vs.RGBS, matrix_in=matrix)  # range: from the frame props
    return rgb, matrix


def describe(path: Path, kind: str, clip: Any, matrix: int, probe: dict[str, Any],
             streams_from: Path | None) -> SourceInfo:
    """The :class:`SourceInfo` of an opened clip (frame 0's props give the colour tags and aspect ratio)."""
    props = clip.get_frame(0).props
    start = 0.0
    if kind == "file":
        video = next(s for s in probe.get("streams", []) if s.get("codec_type") == "video"
                     and not s.get("disposition", {}).get("attached_pic"))
        try:
            start = float(video.get("start_time", 0.0))
        except (TypeError, ValueError):
            start = 0.0
    sar = (int(props.get("_SARNum", 1)) or 1, int(props.get("_SARDen", 1)) or 1)
    return SourceInfo(path=str(path), kind=kind, width=clip.width, height=clip.height, num_frames=clip.num_frames,
                      fps=(clip.fps.numerator, clip.fps.denominator),
                      sample="float16" if clip.format.bytes_per_sample == 2 else "float32", matrix=matrix,
                      primaries=int(props.get("_Primaries", 2)), transfer=int(props.get("_Transfer", 2)), sar=sar,
                      video_start=start, streams_from=str(streams_from) if streams_from else None, probe=probe)


def source_identity(path: Path, kind: str, clip: Any) -> dict[str, Any]:
    """What identifies the input in the fingerprint: for a file its size and 16 spread 1 MiB samples of its bytes
    (a moved or copied file is the same source); for a script its text and three of its frames' bytes."""
    ident: dict[str, Any] = {"kind": kind, "frames": clip.num_frames, "size": [clip.width, clip.height],
                             "fps": [clip.fps.numerator, clip.fps.denominator], "format": clip.format.name}
    digest = hashlib.sha256()
    if kind == "file":
        size = path.stat().st_size
        ident["bytes"] = size
        step = max(1, size // 16)
        with open(path, "rb") as f:
            for k in range(16):
                f.seek(min(k * step, max(0, size - 1)))
                digest.update(f.read(1 << 20))
    else:
        digest.update(path.read_bytes())
        for n in sorted({0, clip.num_frames // 2, clip.num_frames - 1}):
            frame = clip.get_frame(n)
            for p in range(frame.format.num_planes):
                digest.update(np.ascontiguousarray(np.asarray(frame[p])).tobytes())
    ident["digest"] = digest.hexdigest()
    return ident


def plain_props(props: Mapping[str, Any]) -> dict[str, Any]:
    """A frame's props as plain values (numbers, strings, bytes and lists of them); clips, frames and functions
    are left out: they cannot travel to another process."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if isinstance(value, (int, float, str, bytes)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bytes)) for v in value):
            out[key] = list(value)
    return out


class FrameReader:
    """Reads batches of the RGB clip (one per call; frames decoded in parallel by VapourSynth's threads).

    A frame that cannot be decoded, is interlaced or holds NaN/Inf ends its batch with the reason
    (:attr:`FrameBatch.error`)."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip

    @classmethod
    def open(cls, path: str, kind: str, fps: tuple[int, int] | None) -> "FrameReader":
        return cls(open_clip(Path(path), kind, fps)[0])

    def read(self, start: int, count: int) -> FrameBatch:
        import vapoursynth as vs

        count = max(0, min(count, self.clip.num_frames - start))
        futures = [self.clip.get_frame_async(n) for n in range(start, start + count)]
        dtype = np.float16 if self.clip.format.bytes_per_sample == 2 else np.float32
        planes = np.empty((count, 3, self.clip.height, self.clip.width), dtype=dtype)
        props: list[dict[str, Any]] = []
        for k, fut in enumerate(futures):
            n = start + k
            try:
                frame = fut.result()
            except vs.Error as exc:
                return FrameBatch(start, planes[:k], props, f"source frame {n} cannot be decoded: {_last_line(exc)}")
            field_based = int(frame.props.get("_FieldBased", 0))
            if field_based in (1, 2):
                return FrameBatch(start, planes[:k], props,
                                  f"source frame {n} is interlaced (_FieldBased={field_based}); {INTERLACED_FIX}")
            for p in range(3):
                planes[k, p] = np.asarray(frame[p])
            if not np.isfinite(planes[k]).all():
                return FrameBatch(start, planes[:k], props, f"source frame {n} contains NaN or infinite values; fix "
                                  "the source (e.g. replace them with std.Expr in a .vpy) before upscaling")
            props.append(plain_props(frame.props))
        return FrameBatch(start, planes, props)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return lines[-1].removeprefix("vapoursynth.Error: ").removeprefix("Error: ")[:300]


def input_kind(path: Path) -> str:
    """``"vpy"`` for a VapourSynth script (by its extension), else ``"file"``."""
    return "vpy" if path.suffix.lower() in (".vpy", ".py") else "file"


def env_path(value: str) -> Path:
    """A user-given path, with ``~`` expanded, made absolute against the current folder."""
    return Path(os.path.abspath(os.path.expanduser(value)))

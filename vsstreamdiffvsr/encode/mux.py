"""ffmpeg: the encoder settings, one segment per part (raw 10-bit YUV in, NUT out), and the final join without
re-encoding, with the source's audio, subtitles, chapters and metadata, written under a temporary name and
renamed into place only when complete.

Segments are NUT files: their timestamps are exact in the stream's time base, and the concat list gives every
segment its exact duration (frames / fps), so the joined video has constant frame timing whatever the codec's
delay. The colour tags and the sample aspect ratio are set on each segment and again on the joined stream.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

from .errors import BAD_INPUT, FAILED, EncodeError

__all__ = ["tool", "default_encoder_args", "parse_encoder_args", "check_encoder", "colour_args", "SegmentEncoder",
           "join_segments", "temp_output_path", "PIX_FMT"]

#: what the workers hand ffmpeg: the YUV420P10 of ``scripts/upscale.vpy``
PIX_FMT = "yuv420p10le"

_TEXT_SUBS = {"subrip", "srt", "ass", "ssa", "webvtt", "mov_text", "text"}
_MP4_LIKE = {".mp4", ".m4v", ".mov"}
_MKV_LIKE = {".mkv", ".mka", ".mk3d"}


def tool(name: str) -> str:
    """The path of ``ffmpeg`` or ``ffprobe`` on PATH; EncodeError with the install line when missing."""
    found = shutil.which(name)
    if not found:
        raise EncodeError(f"{name} not found on PATH; install ffmpeg (Debian/Ubuntu: apt-get install ffmpeg)")
    return found


def _encoders() -> set[str]:
    res = subprocess.run([tool("ffmpeg"), "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    names = set()
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] == "V":
            names.add(parts[1])
    return names


def default_encoder_args() -> tuple[list[str], str | None]:
    """The default video options and a warning (None when libx265 is there): 10-bit HEVC (libx265, CRF 17,
    preset medium), else 10-bit H.264 (libx264 High 10, CRF 16); EncodeError when ffmpeg has neither."""
    have = _encoders()
    if "libx265" in have:
        return ["-c:v", "libx265", "-preset", "medium", "-crf", "17", "-pix_fmt", PIX_FMT, "-profile:v", "main10",
                "-x265-params", "log-level=error"], None
    if "libx264" in have:
        return (["-c:v", "libx264", "-preset", "medium", "-crf", "16", "-pix_fmt", PIX_FMT, "-profile:v", "high10"],
                "this ffmpeg has no libx265: encoding 10-bit H.264 (libx264) instead; pass --encoder-args to choose")
    raise EncodeError("this ffmpeg has neither libx265 nor libx264; install a full ffmpeg (Debian: apt-get install "
                      "ffmpeg) or choose an encoder it has with --encoder-args (e.g. \"-c:v ffv1\")")


def parse_encoder_args(text: str) -> list[str]:
    """``--encoder-args`` split like a shell line; EncodeError for an unbalanced quote or an empty value."""
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise EncodeError(f"--encoder-args: {exc}; quote it as one argument, e.g. --encoder-args \"-c:v ffv1\"") \
            from None
    if not args:
        raise EncodeError("--encoder-args is empty; give ffmpeg output options such as \"-c:v ffv1\"")
    return args


def colour_args(matrix: int, primaries: int, transfer: int) -> list[str]:
    """ffmpeg's colour options for the output (limited range, as ``resize`` makes it; unspecified tags left out)."""
    from .source import MATRIX_NAMES, PRIMARIES_NAMES, TRANSFER_NAMES

    args = ["-color_range", "tv"]
    for opt, table, code in (("-colorspace", MATRIX_NAMES, matrix), ("-color_primaries", PRIMARIES_NAMES, primaries),
                             ("-color_trc", TRANSFER_NAMES, transfer)):
        if code in table:
            args += [opt, table[code]]
    return args


def _error_line(stderr: str) -> str:
    lines = [re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\] ", "", line).strip() for line in stderr.strip().splitlines()]
    lines = [line for line in lines if line]
    for pattern in (r"Unknown encoder", r"Unrecognized option", r"Error setting option", r"No space left",
                    r"not currently supported in container", r"Option .* not found", r"Invalid argument"):
        for line in lines:
            if re.search(pattern, line):
                return line[:300]
    return (lines[0] if lines else "no reason given")[:300]


def _frame_size(width: int, height: int) -> int:
    return width * height * 3  # 10-bit 4:2:0: 1.5 samples per pixel, 2 bytes each


def _input_args(width: int, height: int, fps: tuple[int, int]) -> list[str]:
    return ["-f", "rawvideo", "-pix_fmt", PIX_FMT, "-video_size", f"{width}x{height}", "-framerate",
            f"{fps[0]}/{fps[1]}", "-i", "pipe:0"]


def _video_filters(sar: tuple[int, int]) -> list[str]:
    return [] if sar[0] == sar[1] else ["-vf", f"setsar={sar[0]}/{sar[1]}"]


def check_encoder(args: Sequence[str], width: int, height: int, fps: tuple[int, int], sar: tuple[int, int],
                  colour: Sequence[str], output_suffix: str, streams_from: Path | None = None,
                  probe: dict[str, Any] | None = None) -> None:
    """Encode two grey frames with ``args`` into the output's container, with a tenth of a second of the source's
    other streams: EncodeError naming ffmpeg's complaint (an unknown encoder, a bad option, a codec or stream the
    container cannot hold) before any frame is upscaled."""
    with tempfile.TemporaryDirectory(prefix="vsstreamdiffvsr-check-") as tmp:
        target = Path(tmp) / f"check{output_suffix or '.mkv'}"
        cmd = [tool("ffmpeg"), "-v", "error", "-y", *_input_args(width, height, fps)]
        maps: list[str] = ["-map", "0:v"]
        codecs: list[str] = []
        if streams_from is not None:
            cmd += ["-i", str(streams_from)]
            more, codecs, _ = _stream_maps(probe or {}, output_suffix)
            maps += more
        cmd += [*maps, "-c", "copy", *_video_filters(sar), *colour, *args, *codecs, "-t", "0.1", str(target)]
        data = bytes([0, 2]) * (_frame_size(width, height) // 2) * 2
        try:
            res = subprocess.run(cmd, input=data, capture_output=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise EncodeError("ffmpeg took over 5 minutes to encode two test frames with these --encoder-args") \
                from None
        if res.returncode != 0:
            why = _error_line(res.stderr.decode(errors="replace"))
            raise EncodeError(f"ffmpeg cannot write {output_suffix or 'the output'} with the video options "
                              f"{shlex.join(args)} and the source's streams: {why}; change --encoder-args or the "
                              "output's extension (.mkv holds every stream)", BAD_INPUT)


class SegmentEncoder:
    """One part's frames piped to ffmpeg as raw YUV420P10, encoded into a NUT file at ``path``.

    :meth:`write` takes the planes of one frame; :meth:`close` waits for ffmpeg and returns the file's bytes.
    Raises EncodeError (FAILED) with ffmpeg's own reason when it fails."""

    def __init__(self, path: Path, width: int, height: int, fps: tuple[int, int], sar: tuple[int, int],
                 colour: Sequence[str], args: Sequence[str]) -> None:
        self.path = path
        cmd = [tool("ffmpeg"), "-v", "error", "-y", *_input_args(width, height, fps), *_video_filters(sar),
               *colour, *args, "-f", "nut", str(path)]
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err)
        self.frames = 0

    def write(self, planes: Sequence[Any]) -> None:
        stdin: IO[bytes] = self.proc.stdin  # type: ignore[assignment]
        try:
            for plane in planes:
                stdin.write(memoryview(plane).cast("B"))
        except BrokenPipeError:
            self.close()  # raises with ffmpeg's reason
            raise EncodeError("ffmpeg stopped reading the frames of a segment", FAILED) from None
        self.frames += 1

    def close(self) -> bytes:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        rc = self.proc.wait()
        self._err.seek(0)
        err = self._err.read().decode(errors="replace")
        self._err.close()
        if rc != 0:
            raise EncodeError(f"ffmpeg failed encoding a segment: {_error_line(err)}", FAILED)
        return self.path.read_bytes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._err.closed:
            self._err.close()


def temp_output_path(output: Path) -> Path:
    """A hidden name beside ``output`` with its extension (ffmpeg picks the container by it)."""
    return output.with_name(f".{output.stem}.partial-{os.getpid()}{output.suffix}")


def _stream_maps(probe: dict[str, Any], suffix: str) -> tuple[list[str], list[str], list[str]]:
    """Maps for the source's streams (input 1), codec options that follow ``-c copy``, and warnings for streams
    left out."""
    streams = probe.get("streams", [])
    maps: list[str] = []
    codecs: list[str] = []
    warnings: list[str] = []
    if any(s.get("codec_type") == "audio" for s in streams):
        maps += ["-map", "1:a"]
    subs = [s for s in streams if s.get("codec_type") == "subtitle"]
    if suffix in _MP4_LIKE:
        text = [s for s in subs if s.get("codec_name") in _TEXT_SUBS]
        for s in text:
            maps += ["-map", f"1:{s['index']}"]
        if text:
            codecs += ["-c:s", "mov_text"]
        if len(text) < len(subs):
            warnings.append(f"{len(subs) - len(text)} picture subtitle stream(s) cannot go into {suffix}: left out "
                            "(use .mkv to keep them)")
    elif subs:
        maps += ["-map", "1:s"]
    if suffix in _MKV_LIKE and any(s.get("codec_type") == "attachment" for s in streams):
        maps += ["-map", "1:t"]
    maps += ["-map_metadata", "1", "-map_chapters", "1"]
    video = next((s for s in streams if s.get("codec_type") == "video"), {})
    for key in ("language", "title", "handler_name"):
        value = (video.get("tags") or {}).get(key)
        if value:
            maps += ["-metadata:s:v:0", f"{key}={value}"]
    return maps, codecs, warnings


def join_segments(segments: Sequence[tuple[Path, int]], fps: tuple[int, int], output: Path, *,
                  colour: Sequence[str], streams_from: Path | None, probe: dict[str, Any], video_start: float,
                  list_dir: Path) -> list[str]:
    """Join ``segments`` ((path, frames) in order) without re-encoding, add the source's other streams, and write
    ``output`` under a temporary name renamed into place at the end. Returns warnings (streams left out).

    The sample aspect ratio travels in the segments' streams. Raises EncodeError naming ffmpeg's complaint
    (DISK_FULL for a full disk); the temporary file is removed."""
    from .errors import DISK_FULL

    rate = Fraction(fps[0], fps[1])
    lines, done = [], 0
    for path, frames in segments:  # durations from cumulative times: no rounding drift over a film
        start, end = round(done / rate, 6), round((done + frames) / rate, 6)
        lines += [f"file '{_concat_quote(path)}'", f"duration {end - start:.6f}"]
        done += frames
    listing = list_dir / "concat.txt"
    listing.write_text("\n".join(lines) + "\n")
    tmp = temp_output_path(output)
    cmd = [tool("ffmpeg"), "-v", "error", "-y", "-nostdin"]
    if video_start:
        cmd += ["-itsoffset", f"{video_start:.6f}"]  # the video keeps its place against the source's audio
    cmd += ["-f", "concat", "-safe", "0", "-i", str(listing)]
    maps: list[str] = []
    codecs: list[str] = []
    warnings: list[str] = []
    if streams_from is not None:
        cmd += ["-i", str(streams_from)]
        maps, codecs, warnings = _stream_maps(probe, output.suffix.lower())
    cmd += ["-map", "0:v:0", *maps, "-c", "copy", *codecs, *colour, "-max_interleave_delta", "0", str(tmp)]
    try:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise EncodeError(f"ffmpeg could not be run: {exc.strerror}", FAILED) from None
        if res.returncode != 0:
            why = _error_line(res.stderr)
            code = DISK_FULL if "No space left" in why else FAILED
            hint = "; free some space and rerun the same command" if code == DISK_FULL else ""
            raise EncodeError(f"ffmpeg could not write {output.name}: {why}{hint}", code)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return warnings


def _concat_quote(path: Path) -> str:
    return str(path).replace("'", "'\\''")

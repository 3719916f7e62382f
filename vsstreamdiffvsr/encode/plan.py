"""The plan of an encode: a pure function of the source (its frame count and cut list) and the settings, never
of the worker count.

* **Scenes** run from one cut to the next; the model's recurrent state restarts cold at each.
* **Chunks** are what one worker runs from start to end: consecutive whole scenes grouped until the next would
  take the chunk past ``part_frames``, or one scene alone. A scene longer than ``max_chunk`` frames is split into
  pieces of equal length; each piece after the first starts cold ``warmup`` frames early (never before its
  scene's first frame), and those frames are computed and discarded. This is the only place where the output
  differs from one uninterrupted run over the scene.
* **Parts** split a chunk's output frames into pieces of at most ``part_frames``: each becomes one encoded
  segment, followed by the recurrent state, so an interrupted chunk resumes at its first unfinished part.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Part", "Chunk", "Plan", "make_chunks", "fingerprint", "describe_changes", "estimate_ms_per_frame",
           "PLAN_VERSION"]

PLAN_VERSION = 1

#: measured ms per frame on an H100 with torch.compile (docs/bench, run 7), by output pixels
_MEASURED_MS = ((1280 * 720, 93.9), (1920 * 1088, 191.3))


@dataclass(frozen=True)
class Part:
    """Output frames ``start`` to ``end - 1`` of a chunk: one segment, then the state."""

    index: int
    start: int
    end: int

    @property
    def frames(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Chunk:
    """Output frames ``start`` to ``end - 1``, computed in order from ``compute_start`` (earlier than ``start`` by
    the warm-up of a split scene). ``cuts``: the frames inside the chunk that start a scene (cold starts besides
    ``compute_start``)."""

    index: int
    start: int
    end: int
    compute_start: int
    cuts: tuple[int, ...]
    parts: tuple[Part, ...]

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def compute_frames(self) -> int:
        return self.end - self.compute_start

    def frames_from(self, part: int) -> int:
        """Frames computed when starting at ``part`` (the warm-up belongs to part 0)."""
        if part <= 0:
            return self.compute_frames
        return sum(p.frames for p in self.parts[part:])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Chunk":
        return cls(int(d["index"]), int(d["start"]), int(d["end"]), int(d["compute_start"]),
                   tuple(int(c) for c in d["cuts"]), tuple(Part(**p) for p in d["parts"]))


@dataclass(frozen=True)
class Plan:
    """The whole plan; ``settings`` and ``source`` are what the fingerprint covers."""

    fingerprint: str
    source: dict[str, Any]
    settings: dict[str, Any]
    total_frames: int
    cuts: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    version: int = PLAN_VERSION
    info: dict[str, Any] = field(default_factory=dict)  # the source's details for the workers and the mux

    @property
    def parts(self) -> int:
        return sum(len(c.parts) for c in self.chunks)

    @property
    def compute_frames(self) -> int:
        return sum(c.compute_frames for c in self.chunks)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(fingerprint=str(d["fingerprint"]), source=dict(d["source"]), settings=dict(d["settings"]),
                   total_frames=int(d["total_frames"]), cuts=tuple(int(c) for c in d["cuts"]),
                   chunks=tuple(Chunk.from_dict(c) for c in d["chunks"]), version=int(d.get("version", 0)),
                   info=dict(d.get("info", {})))


def _balanced(total: int, pieces: int) -> list[int]:
    """``total`` split into ``pieces`` sizes that differ by at most one (larger first)."""
    return [total // pieces + (1 if i < total % pieces else 0) for i in range(pieces)]


def _parts(start: int, end: int, part_frames: int) -> tuple[Part, ...]:
    sizes = _balanced(end - start, max(1, math.ceil((end - start) / part_frames)))
    parts, pos = [], start
    for i, size in enumerate(sizes):
        parts.append(Part(i, pos, pos + size))
        pos += size
    return tuple(parts)


def make_chunks(total_frames: int, cuts: Iterable[int], *, max_chunk: int, warmup: int, part_frames: int
                ) -> tuple[Chunk, ...]:
    """The chunks of a clip of ``total_frames`` frames with scenes starting at ``cuts`` (module docstring).

    Raises ValueError for max_chunk or part_frames < 1, warmup < 0, or no frames."""
    if total_frames < 1:
        raise ValueError("the clip has no frames")
    if max_chunk < 1 or part_frames < 1 or warmup < 0:
        raise ValueError(f"need max_chunk >= 1, part_frames >= 1 and warmup >= 0, got {max_chunk}, {part_frames}, "
                         f"{warmup}")
    bounds = [0, *sorted({int(c) for c in cuts if 0 < int(c) < total_frames}), total_frames]
    pieces: list[tuple[int, int, int, bool]] = []  # start, end, compute_start, whole scene
    for s, e in zip(bounds, bounds[1:]):
        if e - s <= max_chunk:
            pieces.append((s, e, s, True))
            continue
        pos = s
        for i, size in enumerate(_balanced(e - s, math.ceil((e - s) / max_chunk))):
            pieces.append((pos, pos + size, pos if i == 0 else max(s, pos - warmup), False))
            pos += size
    groups: list[list[tuple[int, int, int, bool]]] = []
    for piece in pieces:
        last = groups[-1] if groups else None
        if (last is not None and piece[3] and last[-1][3]
                and piece[1] - last[0][0] <= part_frames):
            last.append(piece)
        else:
            groups.append([piece])
    chunks = []
    for i, group in enumerate(groups):
        start, end = group[0][0], group[-1][1]
        chunks.append(Chunk(i, start, end, group[0][2], tuple(p[0] for p in group[1:]),
                            _parts(start, end, part_frames)))
    return tuple(chunks)


def fingerprint(source: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """sha256 of the source's identity and the settings (canonical JSON)."""
    text = json.dumps({"source": source, "settings": settings, "version": PLAN_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def describe_changes(old: Plan, source: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """What differs between a stored plan and the current source/settings, for the one-line report."""
    changed = []
    if dict(old.source) != dict(source):
        keys = sorted(k for k in set(old.source) | set(source) if old.source.get(k) != source.get(k))
        changed.append(f"the source ({', '.join(keys)})")
    for key in sorted(set(old.settings) | set(settings)):
        a, b = old.settings.get(key), settings.get(key)
        if a != b:
            changed.append(f"{key} {_short(a)} -> {_short(b)}")
    if old.version != PLAN_VERSION:
        changed.append(f"plan version {old.version} -> {PLAN_VERSION}")
    return ", ".join(changed) or "the fingerprint"


def _short(value: Any) -> str:
    text = " ".join(value) if isinstance(value, Sequence) and not isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def estimate_ms_per_frame(width: int, height: int) -> tuple[float, str]:
    """Estimated ms per frame on one H100 for LR ``width`` x ``height`` (x4 out): the measured 720p or 1080p time
    (docs/bench run 7, torch.compile) scaled by output pixels, and where it comes from."""
    pixels = 16 * width * height
    ref_px, ref_ms = min(_MEASURED_MS, key=lambda m: abs(math.log(pixels / m[0])))
    name = "720p" if ref_px == _MEASURED_MS[0][0] else "1080p"
    return ref_ms * pixels / ref_px, f"{ref_ms} ms per {name} frame on an H100 (docs/bench), scaled by pixels"

"""One chunk, part by part, on a loaded pipeline: the frames of ``vsstreamdiffvsr.upscale`` (frame n's noise is
``frame_noise(seed, n, ...)``, a cold start at the chunk's first computed frame and at every scene cut), converted
to YUV420P10 as ``scripts/upscale.vpy`` does, piped to ffmpeg one segment per part, each part followed by the
recurrent state when the chunk goes on mid-scene.

:meth:`Engine.run` is a generator of :class:`Progress` and :class:`PartResult` events: the same code runs
in-process (``--workers 1``) and inside a Ray actor (the events are what travels back). A part's result is
handed over only once its segment is complete, before the next part starts: a worker that dies loses at most
the part it was computing.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NonFiniteOutputError
from .errors import ChunkError
from .mux import SegmentEncoder
from .plan import Chunk
from .source import FrameBatch

__all__ = ["JobSpec", "Task", "Progress", "PartResult", "Engine", "Feed", "state_to_bytes", "state_from_bytes",
           "KILL_ENV", "LOG_ENV"]

#: test hooks: ``FRAME:MARKER`` - the process about to compute frame FRAME kills itself (SIGKILL) unless the file
#: MARKER exists (it is created first, so a resumed run passes); a file path that gets one line per part computed
KILL_ENV = "VSSTREAMDIFFVSR_TEST_KILL_AT"
LOG_ENV = "VSSTREAMDIFFVSR_TEST_LOG"


@dataclass(frozen=True)
class JobSpec:
    """What every chunk of one encode shares: the LR size, the frame rate and aspect, the output matrix and
    sample type, the seed, and ffmpeg's video options (colour tags included)."""

    width: int
    height: int
    fps: tuple[int, int]
    sar: tuple[int, int]
    matrix: int
    sample: str
    seed: int
    colour: tuple[str, ...]
    encoder_args: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """Run ``chunk`` from part ``first_part`` on (``attempt`` counts tries of this chunk, from 1)."""

    chunk: Chunk
    first_part: int = 0
    attempt: int = 1

    @property
    def frames(self) -> int:
        """Frames still to compute."""
        return self.chunk.frames_from(self.first_part)


@dataclass(frozen=True)
class Progress:
    chunk: int
    frames: int  # output frames finished since the last event


@dataclass(frozen=True)
class PartResult:
    chunk: int
    part: int
    frames: int
    segment: bytes
    state: bytes | None  # the state after the part (None: the chunk ends, or a scene starts, right after it)
    seconds: float
    worker: str


def state_to_bytes(state: Any, folder: Path) -> bytes:
    """A StreamState as the bytes of its safetensors file."""
    path = folder / "state.safetensors"
    state.save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def state_from_bytes(data: bytes, folder: Path, device: torch.device) -> Any:
    from vsstreamdiffvsr import StreamState

    path = folder / "resume.safetensors"
    path.write_bytes(data)
    try:
        return StreamState.load(path, device)
    finally:
        path.unlink()


class Feed:
    """Source frames ``start`` to ``end - 1`` in batches from ``read(start, count)``, the next batch read ahead on
    a thread while the current one is computed."""

    def __init__(self, read: Callable[[int, int], FrameBatch], start: int, end: int, batch: int) -> None:
        self._read, self._end, self._batch = read, end, max(1, batch)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vsstreamdiffvsr-feed")
        self._next = start
        self._current: FrameBatch | None = None
        self._future = self._submit()

    def _submit(self) -> Future[FrameBatch] | None:
        if self._next >= self._end:
            return None
        start, count = self._next, min(self._batch, self._end - self._next)
        self._next += count
        return self._pool.submit(self._read, start, count)

    def get(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        cur = self._current
        while cur is None or not (cur.start <= n < cur.start + len(cur.planes)):
            if cur is not None and cur.error is not None and n >= cur.start + len(cur.planes):
                raise ChunkError(cur.error)
            if self._future is None:
                raise IndexError(f"frame {n} is outside the feed")
            cur = self._current = self._future.result()
            self._future = self._submit() if cur.error is None else None
        k = n - cur.start
        return cur.planes[k], cur.props[k]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Converter:
    """Output tensors -> YUV420P10 planes through VapourSynth, exactly as the filter's frames go through
    ``core.resize.Bicubic(up, format=vs.YUV420P10, matrix=...)`` in ``scripts/upscale.vpy``."""

    def __init__(self, spec: JobSpec, frames: int) -> None:
        import vapoursynth as vs

        core = vs.core
        fmt = vs.RGBH if spec.sample == "float16" else vs.RGBS
        blank = core.std.BlankClip(format=fmt, width=4 * spec.width, height=4 * spec.height, length=max(1, frames),
                                   fpsnum=spec.fps[0], fpsden=spec.fps[1], keep=True)
        self.template = blank.get_frame(0)
        self._frames: dict[int, Any] = {}
        src = blank.std.ModifyFrame(blank, lambda n, f: self._frames[n])
        self.yuv = core.resize.Bicubic(src, format=vs.YUV420P10, matrix=spec.matrix)

    def __call__(self, k: int, hq: torch.Tensor, props: dict[str, Any]) -> list[np.ndarray]:
        from vsstreamdiffvsr.filter.frames import tensor_to_frame

        props = {**props, "_FieldBased": 0}
        self._frames[k] = tensor_to_frame(hq, self.template, props)
        out = self.yuv.get_frame(k)
        del self._frames[k]
        return [np.ascontiguousarray(np.asarray(out[p])) for p in range(3)]


def _test_hooks(n: int, what: str | None = None, chunk: int = -1, part: int = -1) -> None:
    if what is not None:
        log = os.environ.get(LOG_ENV)
        if log:
            with open(log, "a") as f:
                f.write(f"{what} {chunk} {part} {os.getpid()}\n")
        return
    spec = os.environ.get(KILL_ENV)
    if spec:
        frame, _, marker = spec.partition(":")
        if frame.isdigit() and int(frame) == n and marker and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)


class Engine:
    """A loaded pipeline running chunks for one encode (:class:`JobSpec`)."""

    def __init__(self, pipe: Any, spec: JobSpec, name: str = "local") -> None:
        self.pipe, self.spec, self.name = pipe, spec, name
        self.noise_shape = pipe.noise_shape(spec.height, spec.width)
        self._tmp = Path(tempfile.mkdtemp(prefix="vsstreamdiffvsr-worker-"))
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        frame_bytes = 3 * spec.width * spec.height * (2 if spec.sample == "float16" else 4)
        self.batch = int(max(1, min(16, (64 << 20) // frame_bytes)))

    def warm_up(self) -> None:
        """Two throwaway frames at the clip's size, a cold one and a warm one: whatever the pipeline compiles or
        tunes for this size happens now, while the driver is still finding the scene cuts."""
        from vsstreamdiffvsr import StreamState

        lq = torch.full((1, 3, self.spec.height, self.spec.width), 0.5, device=self.pipe.device)
        state = StreamState()
        for n in range(2):
            _, state = self.pipe.process_frame(lq, state, noise=torch.zeros(self.noise_shape))
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)

    def run(self, task: Task, read: Callable[[int, int], FrameBatch], state: bytes | None = None
            ) -> Iterator[Progress | PartResult]:
        """Compute ``task``'s parts in order, yielding progress and each finished part. ``state`` is the state
        after part ``task.first_part - 1`` (None: that part ends where a scene starts, or the task starts at part
        0). Raises ChunkError naming the frame for a source frame that cannot be used."""
        from vsstreamdiffvsr import StreamState, frame_noise

        chunk = task.chunk
        cuts = set(chunk.cuts)
        if task.first_part == 0:
            pos, carry = chunk.compute_start, StreamState()
        else:
            pos = chunk.parts[task.first_part].start
            carry = state_from_bytes(state, self._tmp, self.pipe.device) if state else StreamState()
        feed = Feed(read, pos, chunk.end, self.batch)
        n = pos
        try:
            for part in chunk.parts[task.first_part:]:
                began = time.monotonic()
                _test_hooks(-1, "start", chunk.index, part.index)
                seg_path = self._tmp / f"c{chunk.index}-p{part.index}.nut"
                encoder = SegmentEncoder(seg_path, 4 * self.spec.width, 4 * self.spec.height, self.spec.fps,
                                         self.spec.sar, self.spec.colour, self.spec.encoder_args)
                try:
                    convert = _Converter(self.spec, part.frames)
                    for n in range(pos, part.end):
                        _test_hooks(n)
                        planes, props = feed.get(n)
                        if n in cuts:
                            carry = StreamState()
                        lq = torch.from_numpy(planes)[None].to(device=self.pipe.device, dtype=torch.float32)
                        hq, carry = self.pipe.process_frame(lq.clamp_(0.0, 1.0), carry,
                                                            noise=frame_noise(self.spec.seed, n, self.noise_shape))
                        if n >= part.start:
                            encoder.write(convert(n - part.start, hq, props))
                            yield Progress(chunk.index, 1)
                    segment = encoder.close()
                except BaseException:
                    encoder.kill()
                    raise
                finally:
                    seg_path.unlink(missing_ok=True)
                pos = part.end
                goes_on = part.end < chunk.end and part.end not in cuts
                saved = state_to_bytes(carry, self._tmp) if goes_on else None
                _test_hooks(-1, "done", chunk.index, part.index)
                yield PartResult(chunk.index, part.index, part.frames, segment, saved, time.monotonic() - began,
                                 self.name)
        except (ValueError, NonFiniteOutputError) as exc:  # the pipeline's refusal of a frame (NaN out, bad values)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ChunkError(f"frame {n}: {first}") from None
        finally:
            feed.close()

"""Progress on stderr: tqdm bars on a terminal (the whole encode, then one line per worker), plain lines every
``interval`` seconds otherwise (a log file, a pipe, CI). Frames are output frames; the rate is over the last
minute, the ETA from it. stdout is never written."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import IO, Any

__all__ = ["Display"]


class _Rate:
    """Frames per second over a sliding window of ``window`` seconds."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, frames: int, now: float) -> None:
        self.total += frames
        self.samples.append((now, self.total))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.window:
            self.samples.popleft()

    def fps(self, now: float) -> float:
        if len(self.samples) < 2:
            return 0.0
        t0, f0 = self.samples[0]
        return (self.total - f0) / max(now - t0, 1e-6)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Display:
    """The encode's progress: ``total`` output frames, ``done`` of them finished before this run."""

    def __init__(self, total: int, done: int, workers: list[str], *, stream: IO[str] | None = None,
                 interval: float = 30.0, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.interval = total, done, interval
        self.tty = self.stream.isatty() if tty is None else tty
        self.rate = _Rate()
        self.workers = {w: _Rate() for w in workers}
        self.current: dict[str, str] = {}
        self.started = self.last_line = time.monotonic()
        self._bars: dict[str, Any] = {}
        if self.tty:
            from tqdm import tqdm

            self._bars[""] = tqdm(total=total, initial=done, unit="frame", desc="encode", file=self.stream,
                                  dynamic_ncols=True, smoothing=0.05)
            for i, w in enumerate(workers, 1):
                self._bars[w] = tqdm(total=0, unit="frame", desc=f"  {w}", file=self.stream, position=i,
                                     dynamic_ncols=True, bar_format="{desc}: {n_fmt} frames {rate_fmt} {postfix}")
        else:
            self._line(f"encode: {done} of {total} frames done before this run")

    def chunk(self, worker: str, text: str) -> None:
        """What ``worker`` is on (e.g. ``chunk 12 part 3``)."""
        self.current[worker] = text
        bar = self._bars.get(worker)
        if bar is not None:
            bar.set_postfix_str(text, refresh=False)

    def frames(self, worker: str, n: int) -> None:
        now = time.monotonic()
        self.done += n
        self.rate.add(n, now)
        self.workers.setdefault(worker, _Rate()).add(n, now)
        if self.tty:
            self._bars[""].update(n)
            if worker in self._bars:
                self._bars[worker].update(n)
        else:
            self.tick()

    def tick(self) -> None:
        """A plain line when ``interval`` seconds have passed (no-op on a terminal)."""
        now = time.monotonic()
        if not self.tty and now - self.last_line >= self.interval:
            self._line(self.summary(now))

    def summary(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        fps = self.rate.fps(now)
        left = self.total - self.done
        eta = _clock(left / fps) if fps > 0 else "?"
        pct = 100.0 * self.done / max(1, self.total)
        per = ", ".join(f"{w} {r.fps(now):.2f} fps" + (f" ({self.current[w]})" if w in self.current else "")
                        for w, r in self.workers.items())
        return (f"encode: {self.done} of {self.total} frames ({pct:.1f}%), {fps:.2f} fps, ETA {eta}, elapsed "
                f"{_clock(now - self.started)}; workers: {per}")

    def note(self, text: str) -> None:
        """A message line that does not break the bars."""
        if self.tty:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        self.last_line = time.monotonic()
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        if not self.tty:
            self._line(self.summary())

"""The ordered producer: turns random-access frame requests into one recurrent pass.

Stream-DiffVSR is recurrent (frame n needs frame n-1's output) while VapourSynth asks for frames in
parallel and out of order. This module holds the rules, independent of VapourSynth:

* Output ``n`` is the pipeline run over frames ``s..n``, where ``s`` is the start of the current run:
  frame 0, a seek point, the last scene cut, or the frame after a source frame that failed.
* A request up to ``max_gap`` frames after the last produced frame is *caught up exactly*: the
  missing frames are computed in order and the ones not yet asked for are kept in a small cache.
* A request behind the last produced frame (and not cached) or more than ``max_gap`` ahead is a
  *seek*: a cold start at ``n``, after ``warmup`` earlier frames computed and discarded.
* With ``reset_on_scene_change``, a frame flagged as a scene cut starts a new run (cold start).
* Before anything is produced the producer behaves as if frame -1 had been, so a burst of parallel
  first requests (3, 0, 7, ...) is a catch-up from frame 0, not a timing-dependent seek.
* A frame fails only for itself: a source frame (or step) that fails while catching up to a later request
  restarts the run after it; the request for that frame itself raises its error.

The step gets the source frame, a look at the next one and a carry (the recurrent state and whatever the
previous step computed ahead for this frame); the producer resets the carry at every cold start.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["OrderedProducer", "SourceFrame", "Source", "SourceError"]

P = TypeVar("P")  # what the source gives for one frame
O = TypeVar("O")  # what the step returns for one output frame
C = TypeVar("C")  # what one step hands the next (the recurrent state, the look-ahead)


@dataclass
class SourceFrame(Generic[P]):
    """One input frame as the producer sees it."""

    payload: P
    scene_cut: bool = False


class SourceError(RuntimeError):
    """A source frame could not be had (the message names it)."""


class Source(Protocol[P]):
    def fetch(self, i: int) -> SourceFrame[P]:
        """Source frame ``i`` (may block; raises for a frame that cannot be had)."""

    def peek(self, i: int) -> SourceFrame[P] | None:
        """Source frame ``i`` if it is at hand without waiting, else None (never raises)."""


class OrderedProducer(Generic[P, O, C]):
    """Serialises recurrent processing behind random-access requests (thread-safe).

    Args:
        step: ``step(i, source_frame, peek_next, carry) -> (output, carry)`` runs the model on frame ``i``;
            ``peek_next()`` is :meth:`Source.peek` of frame ``i + 1`` (None at the end, or when not at hand).
        cold: makes the carry of a cold start.
        max_gap: the largest forward jump that is caught up exactly (>= 1).
        warmup: frames computed and discarded before a seek target (>= 0).
        reset_on_scene_change: honour :attr:`SourceFrame.scene_cut`.
        cache_size: outputs kept (default ``2 * max_gap``); frames already delivered are evicted first.
        keep_delivered: at most this many delivered frames are kept (default ``cache_size``).
        length: the number of source frames (no look past the last).
    """

    def __init__(self, step: Callable[[int, P, Callable[[], SourceFrame[P] | None], C], tuple[O, C]], *,
                 cold: Callable[[], C], max_gap: int = 16, warmup: int = 0, reset_on_scene_change: bool = True,
                 cache_size: int | None = None, keep_delivered: int | None = None, length: int | None = None) -> None:
        if max_gap < 1:
            raise ValueError("max_gap must be >= 1")
        if warmup < 0:
            raise ValueError("warmup must be >= 0")
        self._step, self._cold = step, cold
        self.max_gap = max_gap
        self.warmup = warmup
        self.reset_on_scene_change = reset_on_scene_change
        self.length = length
        self.cache_size = cache_size if cache_size is not None else 2 * max_gap
        self.keep_delivered = max(1, keep_delivered) if keep_delivered is not None else self.cache_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, O] = OrderedDict()
        self._delivered: set[int] = set()
        self._last = -1
        self._carry = cold()
        #: counters for tests and diagnostics
        self.steps = 0
        self.seeks = 0
        self.restarts = 0

    @property
    def last_produced(self) -> int:
        return self._last

    def _evict(self, keep: int) -> None:
        delivered = [k for k in self._cache if k in self._delivered]
        excess = len(delivered) - self.keep_delivered
        for k in [k for k in delivered if k != keep][: max(0, excess)]:  # the oldest first
            del self._cache[k]
            self._delivered.discard(k)
        while len(self._cache) > self.cache_size:
            victim = next((k for k in self._cache if k in self._delivered and k != keep), None)
            if victim is None:
                victim = next(k for k in self._cache if k != keep)
            del self._cache[victim]
            self._delivered.discard(victim)

    def get(self, n: int, source: Source[P]) -> O:
        """Output frame ``n``; ``source`` supplies the frames (fetched in increasing order)."""
        with self._lock:
            if n in self._cache:
                self._delivered.add(n)
                out = self._cache[n]
                self._evict(keep=n)
                return out
            if self._last < n <= self._last + self.max_gap:
                start, keep_from, carry = self._last + 1, self._last + 1, self._carry
            else:
                start, keep_from, carry = max(0, n - self.warmup), n, self._cold()
                self.seeks += 1
                # what the cache holds belongs to the run just left: serving it later would mix two runs, and
                # a frame served from it would not advance the new run (the next request a needless seek)
                self._cache.clear()
                self._delivered.clear()
            for i in range(start, n + 1):
                try:
                    src = source.fetch(i)
                    if self.reset_on_scene_change and src.scene_cut:
                        carry = self._cold()
                    out, carry = self._step(i, src.payload, self._peek(source, i + 1), carry)
                except Exception as exc:
                    if i == n:
                        raise
                    # a frame before the one asked for failed: it fails alone, when asked for itself; the run
                    # restarts after it (nothing of it is carried)
                    self._carry, self._last, carry = self._cold(), i, self._cold()
                    self.restarts += 1
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    warnings.warn(f"vsstreamdiffvsr: frame {i} failed ({first}); the run restarts cold at frame "
                                  f"{i + 1}", RuntimeWarning, stacklevel=2)
                    continue
                self.steps += 1
                # commit after every frame: an error later in the loop leaves a consistent producer
                self._carry, self._last = carry, i
                if i >= keep_from:
                    self._cache[i] = out
                    self._evict(keep=n)
            self._delivered.add(n)
            self._evict(keep=n)
            return self._cache[n]

    def _peek(self, source: Source[P], i: int) -> Callable[[], SourceFrame[P] | None]:
        def peek() -> SourceFrame[P] | None:
            if self.length is not None and i >= self.length:
                return None
            try:
                return source.peek(i)
            except Exception:  # a look ahead never fails the frame being made
                return None

        return peek

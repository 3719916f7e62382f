"""The ordered producer: turns random-access frame requests into one recurrent pass.

Stream-DiffVSR is recurrent (frame n needs frame n-1's output) while VapourSynth asks for frames in
parallel and out of order. This module holds the rules, independent of VapourSynth:

* Output ``n`` is the pipeline run over frames ``s..n``, where ``s`` is the start of the current run:
  frame 0, a seek point, or the last scene cut.
* A request up to ``max_gap`` frames after the last produced frame is *caught up exactly*: the
  missing frames are computed in order and the ones not yet asked for are kept in a small cache.
* A request behind the last produced frame (and not cached) or more than ``max_gap`` ahead is a
  *seek*: a cold start at ``n``, after ``warmup`` earlier frames computed and discarded.
* With ``reset_on_scene_change``, a frame flagged as a scene cut starts a new run (cold start).
* Before anything is produced the producer behaves as if frame -1 had been, so a burst of parallel
  first requests (3, 0, 7, ...) is a catch-up from frame 0, not a timing-dependent seek.

All of it is a pure function of the request history *modulo caching*, and for in-order playback with
at most ``max_gap`` frames in flight it is a pure function of the frame number.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .state import StreamState

__all__ = ["OrderedProducer", "SourceFrame", "frame_noise", "frame_seed"]

P = TypeVar("P")  # what the caller's fetch returns for one source frame
O = TypeVar("O")  # what the step returns for one output frame


def frame_seed(seed: int, n: int) -> int:
    """The 64-bit generator seed for frame ``n``: a pure function of (seed, n)."""
    return int.from_bytes(hashlib.sha256(f"vsstreamdiffvsr:{int(seed)}:{int(n)}".encode()).digest()[:8], "little")


def frame_noise(seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial latent noise for frame ``n`` (float32, CPU): the same on every device and thread count."""
    gen = torch.Generator(device="cpu").manual_seed(frame_seed(seed, n))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


@dataclass
class SourceFrame(Generic[P]):
    """One input frame as the producer sees it."""

    payload: P
    scene_cut: bool = False


class OrderedProducer(Generic[P, O]):
    """Serialises recurrent processing behind random-access requests (thread-safe).

    Args:
        step: ``step(i, source_payload, state) -> (output, new_state)`` runs the model on frame ``i``.
        max_gap: the largest forward jump that is caught up exactly (>= 1).
        warmup: frames computed and discarded before a seek target (>= 0).
        reset_on_scene_change: honour :attr:`SourceFrame.scene_cut`.
        cache_size: outputs kept (default ``2 * max_gap``); frames already delivered are evicted first.
        keep_delivered: at most this many delivered frames are kept (default ``cache_size``), for repeated
            requests that VapourSynth's own cache did not serve; a bound on memory for large frames.
    """

    def __init__(self, step: Callable[[int, P, StreamState], tuple[O, StreamState]], *, max_gap: int = 16,
                 warmup: int = 0, reset_on_scene_change: bool = True, cache_size: int | None = None,
                 keep_delivered: int | None = None) -> None:
        if max_gap < 1:
            raise ValueError("max_gap must be >= 1")
        if warmup < 0:
            raise ValueError("warmup must be >= 0")
        self._step = step
        self.max_gap = max_gap
        self.warmup = warmup
        self.reset_on_scene_change = reset_on_scene_change
        self.cache_size = cache_size if cache_size is not None else 2 * max_gap
        self.keep_delivered = max(1, keep_delivered) if keep_delivered is not None else self.cache_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, O] = OrderedDict()
        self._delivered: set[int] = set()
        self._last = -1
        self._state = StreamState()
        #: counters for tests and diagnostics
        self.steps = 0
        self.seeks = 0

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

    def get(self, n: int, fetch: Callable[[int], SourceFrame[P]]) -> O:
        """Output frame ``n``; ``fetch(i)`` supplies source frame ``i`` (called in increasing order)."""
        with self._lock:
            if n in self._cache:
                self._delivered.add(n)
                out = self._cache[n]
                self._evict(keep=n)
                return out
            if self._last < n <= self._last + self.max_gap:
                start, keep_from, state = self._last + 1, self._last + 1, self._state
            else:
                start, keep_from, state = max(0, n - self.warmup), n, StreamState()
                self.seeks += 1
                # what the cache holds belongs to the run just left: serving it later would mix two runs, and
                # a frame served from it would not advance the new run (the next request a needless seek)
                self._cache.clear()
                self._delivered.clear()
            for i in range(start, n + 1):
                src = fetch(i)
                if self.reset_on_scene_change and src.scene_cut:
                    state = StreamState()
                out, state = self._step(i, src.payload, state)
                self.steps += 1
                # commit after every frame: an error later in the loop leaves a consistent producer
                self._state, self._last = state, i
                if i >= keep_from:
                    self._cache[i] = out
                    self._evict(keep=n)
            self._delivered.add(n)
            self._evict(keep=n)
            return self._cache[n]

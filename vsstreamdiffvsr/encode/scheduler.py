"""Who runs what, when: the scheduling policy, and the driver loop that applies it to workers.

The policy (:class:`Policy`) is plain bookkeeping, also driven by ``scripts/simulate_encode.py``:

* chunks go out longest first (by frames still to compute; ties by position in the film);
* a chunk whose worker is lost goes back into the queue from its first unfinished part, to any worker; after
  ``max_attempts`` losses of the same chunk the encode stops (the chunk, not the machine, is then the likely cause);
* a chunk that fails for a reason of its own (:class:`ChunkError`) stops the encode at once.

The driver loop (:func:`drive`) owns the policy and the work folder in one thread. Workers are *slots*: each
runs one task at a time on a thread of its own and reports :class:`~vsstreamdiffvsr.encode.worker.Progress`,
:class:`~vsstreamdiffvsr.encode.worker.PartResult`, and at the end :class:`Finished`, :class:`Lost`,
:class:`Failed` or :class:`Gone` through one queue, so the parts of a task are stored before its end is handled.
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import FAILED, ChunkError, EncodeError
from .plan import Chunk
from .worker import PartResult, Progress, Task

__all__ = ["Policy", "Slot", "Finished", "Lost", "Failed", "Gone", "Ready", "drive"]


class Policy:
    """Longest chunk first; a lost chunk resumes from its first unfinished part (module docstring)."""

    def __init__(self, chunks: Sequence[Chunk], finished: Iterable[tuple[int, int]], max_attempts: int = 3) -> None:
        self.chunks = {c.index: c for c in chunks}
        self.done: set[tuple[int, int]] = set(finished)
        self.max_attempts = max_attempts
        self._heap: list[tuple[int, int, Task]] = []
        self.running: dict[int, Task] = {}
        for chunk in chunks:
            first = self.first_unfinished(chunk.index)
            if first is not None:
                self._push(Task(chunk, first))

    def _push(self, task: Task) -> None:
        heapq.heappush(self._heap, (-task.frames, task.chunk.index, task))

    def first_unfinished(self, chunk: int) -> int | None:
        """The first part of ``chunk`` not finished (parts are computed in order), None when all are."""
        c = self.chunks[chunk]
        return next((p.index for p in c.parts if (chunk, p.index) not in self.done), None)

    def next(self) -> Task | None:
        """The longest waiting task (None: none waiting)."""
        if not self._heap:
            return None
        task = heapq.heappop(self._heap)[2]
        self.running[task.chunk.index] = task
        return task

    def part_done(self, chunk: int, part: int) -> None:
        self.done.add((chunk, part))

    def finished(self, task: Task) -> None:
        self.running.pop(task.chunk.index, None)

    def lost(self, task: Task, why: str) -> Task:
        """Requeue a task whose worker died; EncodeError once the chunk has been lost ``max_attempts`` times."""
        self.running.pop(task.chunk.index, None)
        first = self.first_unfinished(task.chunk.index)
        if first is None:
            return task
        if task.attempt >= self.max_attempts:
            raise EncodeError(f"chunk {task.chunk.index} (frames {task.chunk.start}-{task.chunk.end - 1}) lost its "
                              f"worker {task.attempt} times, the last time: {why}; finished parts are kept", FAILED)
        again = Task(task.chunk, first, task.attempt + 1)
        self._push(again)
        return again

    @property
    def waiting(self) -> int:
        return len(self._heap)

    @property
    def all_done(self) -> bool:
        return not self._heap and not self.running and all(
            (c.index, p.index) in self.done for c in self.chunks.values() for p in c.parts)

    def frames_left(self) -> int:
        return sum(c.frames_from(self.first_unfinished(c.index) or 0) for c in self.chunks.values()
                   if self.first_unfinished(c.index) is not None)


# -- what slots report
@dataclass(frozen=True)
class Finished:
    task: Task


@dataclass(frozen=True)
class Lost:
    task: Task
    why: str


@dataclass(frozen=True)
class Failed:
    """The task failed for a reason of its own (ChunkError) or the slot hit an error that ends the encode."""

    task: Task | None
    error: EncodeError


@dataclass(frozen=True)
class Gone:
    """The slot's worker will not come back (its machine is lost, or it cannot start)."""

    why: str


@dataclass(frozen=True)
class Ready:
    """The slot is free again (after a loss, its worker has come back)."""


class Slot(Protocol):
    """One worker: runs one task at a time and reports through the driver's queue."""

    name: str

    def start(self, task: Task, state: bytes | None) -> None:
        """Run ``task`` on the slot's thread; report events as (slot, event) on the queue given at creation."""

    def stop(self) -> None:
        """Stop as soon as possible (the current part is dropped); no more events after the stop is seen."""

    def ack(self) -> None:
        """The last PartResult is stored: the worker may go on to the next part (it waits until then, so that a
        worker that dies loses at most the part it is computing)."""


@dataclass
class Events:
    """The queue slots report into."""

    q: "queue.Queue[tuple[Slot, Any]]" = field(default_factory=queue.Queue)

    def put(self, slot: Slot, event: Any) -> None:
        self.q.put((slot, event))


def drive(policy: Policy, slots: Sequence[Slot], events: Events, *, state_of: Callable[[int, int], bytes | None],
          on_part: Callable[[Slot, PartResult], None], on_progress: Callable[[Slot, int], None],
          on_idle: Callable[[], None] = lambda: None, tick: float = 1.0) -> None:
    """Run the policy's tasks on ``slots`` until every part is finished. ``state_of(chunk, part)`` gives the saved
    state after a part; ``on_part`` stores a finished part (before the policy counts it); ``on_progress`` counts
    frames; ``on_idle`` runs every ``tick`` seconds. Raises ChunkError/EncodeError to stop the encode; the caller
    stops the slots."""
    idle = list(slots)
    alive = set(id(s) for s in slots)
    while not policy.all_done:
        while idle and policy.waiting:
            slot = idle.pop(0)
            task = policy.next()
            assert task is not None
            state = state_of(task.chunk.index, task.first_part - 1) if task.first_part > 0 else None
            slot.start(task, state)
        if not policy.running and not policy.waiting:
            break
        if not alive:
            raise EncodeError("every worker is lost; finished parts are kept: rerun the same command to resume",
                              FAILED)
        try:
            slot, event = events.q.get(timeout=tick)
        except queue.Empty:
            on_idle()
            continue
        if isinstance(event, Progress):
            on_progress(slot, event.frames)
        elif isinstance(event, PartResult):
            on_part(slot, event)
            policy.part_done(event.chunk, event.part)
            slot.ack()
        elif isinstance(event, Finished):
            policy.finished(event.task)
            idle.append(slot)
        elif isinstance(event, Lost):
            policy.lost(event.task, event.why)
        elif isinstance(event, Ready):
            idle.append(slot)
        elif isinstance(event, Gone):
            alive.discard(id(slot))
        elif isinstance(event, Failed):
            raise event.error
        on_idle()


class ThreadSlot:
    """A slot whose tasks run on a thread of this process: ``run(task, state)`` yields the worker's events
    (the in-process worker of ``--workers 1``, and the thread that follows one Ray actor)."""

    def __init__(self, name: str, events: Events, run: Callable[[Task, bytes | None], Iterable[Any]],
                 lost_errors: tuple[type[BaseException], ...] = (), recover: Callable[[], bool] | None = None) -> None:
        self.name, self._events, self._run = name, events, run
        self._lost_errors, self._recover = lost_errors, recover
        self._stop = threading.Event()
        self._acked = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, task: Task, state: bytes | None) -> None:
        self._thread = threading.Thread(target=self._body, args=(task, state), daemon=True,
                                        name=f"vsstreamdiffvsr-{self.name}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._acked.set()

    def ack(self) -> None:
        self._acked.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _body(self, task: Task, state: bytes | None) -> None:
        events = self._events
        try:
            stream = self._run(task, state)
            try:
                for event in stream:
                    if self._stop.is_set():
                        return
                    if isinstance(event, PartResult):
                        self._acked.clear()
                        events.put(self, event)
                        self._acked.wait()  # the stream (and so the worker) goes on once the part is stored
                    else:
                        events.put(self, event)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            events.put(self, Finished(task))
        except ChunkError as exc:
            events.put(self, Failed(task, exc))
        except self._lost_errors as exc:
            if self._stop.is_set():
                return
            events.put(self, Lost(task, _first_line(exc)))
            if self._recover is not None and self._recover():
                events.put(self, Ready())
            else:
                events.put(self, Gone(f"{self.name} did not come back"))
        except EncodeError as exc:
            events.put(self, Failed(task, exc))
        except BaseException as exc:  # anything else on an in-process worker ends the encode with its reason
            if not self._stop.is_set():
                events.put(self, Failed(task, EncodeError(f"chunk {task.chunk.index}: {type(exc).__name__}: "
                                                          f"{_first_line(exc)}", FAILED)))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]

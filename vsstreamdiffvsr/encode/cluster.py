"""Ray: the engine that spreads chunks over every GPU of a machine (``--workers N``) or of a cluster
(``--ray-address``). One actor per GPU holds a model (``--device cpu``: one per worker, one CPU each); reader
actors on the driver's machine decode the source and hand out frames, so no machine but the driver's needs the
input file; finished segments and states come back as the actors' streamed results, so none needs the work
folder. An actor whose process dies is restarted by Ray (on another machine if its own is lost) and its chunk
goes back into the queue from its last finished part.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import BAD_INPUT, FAILED, ChunkError, EncodeError
from .scheduler import Events, ThreadSlot
from .worker import JobSpec, PartResult, Task

__all__ = ["RayCluster", "ray_module"]


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise EncodeError("--workers > 1 and --ray-address need Ray: pip install \"vsstreamdiffvsr[cluster]\"") \
            from None
    return ray


def _actor_classes(ray: Any) -> tuple[Any, Any]:
    from .source import FrameReader
    from .worker import Engine

    class Reader:
        def __init__(self, path: str, kind: str, fps: tuple[int, int] | None) -> None:
            self.reader = FrameReader.open(path, kind, fps)

        def read(self, start: int, count: int) -> Any:
            return self.reader.read(start, count)

        def ping(self) -> bool:
            return True

    class Worker:
        def __init__(self, model_dir: str | None, options: dict[str, Any], spec: JobSpec, readers: list[str],
                     hooks: dict[str, str], threads: int | None) -> None:
            os.environ.update(hooks)
            import torch

            if threads:
                torch.set_num_threads(threads)
            from vsstreamdiffvsr import StreamDiffVSR

            pipe = StreamDiffVSR.from_pretrained(model_dir, **options)
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            name = f"{socket.gethostname()}:{'gpu' + gpu if gpu and pipe.device.type == 'cuda' else os.getpid()}"
            self.engine = Engine(pipe, spec, name)
            self.engine.warm_up()
            self._acked = threading.Event()
            self.readers = [ray.get_actor(r) for r in readers]  # by name: no handles among the restart arguments

        def ping(self) -> str:
            return self.engine.name

        def ack(self) -> None:
            self._acked.set()

        def run(self, task: Task, state: bytes | None) -> Iterator[Any]:
            reader = self.readers[task.chunk.index % len(self.readers)]

            def read(start: int, count: int) -> Any:
                return ray.get(reader.read.remote(start, count))

            for event in self.engine.run(task, read, state):
                if isinstance(event, PartResult):
                    self._acked.clear()
                    yield event
                    self._acked.wait()  # the driver has stored the part: at most one part is lost with this actor
                else:
                    yield event

    return ray.remote(Reader), ray.remote(Worker)


@dataclass
class RayCluster:
    """A Ray session for one encode: started here (``--workers N``) or joined (``--ray-address``)."""

    ray: Any
    started: bool
    actors: list[Any] = field(default_factory=list)
    readers: list[Any] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)

    @classmethod
    def connect(cls, address: str | None, workers: int, device: str) -> "RayCluster":
        """Join ``address`` or start a local Ray for ``workers`` workers on ``device`` ('cuda' or 'cpu'); a Ray
        already initialised in this process is used as it is. EncodeError when it cannot be reached or has too
        few GPUs."""
        ray = ray_module()
        started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                                      "configure_logging": True}
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    cpus = max(os.cpu_count() or 1, workers + 1) if device == "cpu" else None
                    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise EncodeError(f"cannot start or join {where}: {_first_line(exc)}", BAD_INPUT) from None
            started = True
        self = cls(ray, started)
        have = ray.cluster_resources()
        if device == "cuda" and have.get("GPU", 0) < workers:
            self.close()
            raise EncodeError(f"{workers} GPU workers asked for, but the Ray cluster has {int(have.get('GPU', 0))} "
                              "GPU(s); lower --workers or add machines (ray start --address=...)", BAD_INPUT)
        return self

    def gpu_count(self) -> int:
        return int(self.ray.cluster_resources().get("GPU", 0))

    def start_workers(self, *, workers: int, device: str, spec: JobSpec, model_dir: str | None,
                      options: dict[str, Any], source: tuple[str, str, tuple[int, int] | None],
                      hooks: dict[str, str], threads: int | None) -> None:
        """Start the reader actors (on this machine, where the input is) and the worker actors; they load their
        models and warm up in the background (see :meth:`slots`)."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        reader_cls, worker_cls = _actor_classes(ray)
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        tag = uuid.uuid4().hex[:12]
        names = [f"vsstreamdiffvsr-reader-{tag}-{i}" for i in range(max(1, min(4, workers // 8)))]
        self.readers = [reader_cls.options(name=name, num_cpus=0, max_concurrency=4, scheduling_strategy=here,
                                           max_restarts=-1, max_task_retries=-1).remote(*source) for name in names]
        resources = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        self.workers = [worker_cls.options(**resources, max_restarts=-1, max_task_retries=0,
                                           max_concurrency=2).remote(model_dir, options, spec, names, hooks, threads)
                        for _ in range(workers)]
        self.actors += self.readers + self.workers

    def slots(self, events: Events) -> list[ThreadSlot]:
        """One slot per worker actor, once all are up; EncodeError when one cannot start (its reason, e.g. a
        model folder missing on its machine)."""
        ray = self.ray
        try:
            ray.get([r.ping.remote() for r in self.readers])
            names = ray.get([a.ping.remote() for a in self.workers])
        except Exception as exc:
            raise EncodeError(f"a worker could not start: {_cause(exc)}", FAILED) from None
        lost = _lost_errors(ray)
        return [ThreadSlot(name, events, self._runner(actor), lost_errors=lost, recover=self._recoverer(actor))
                for actor, name in zip(self.workers, names)]

    def _runner(self, actor: Any) -> Any:
        ray = self.ray

        def run(task: Task, state: bytes | None) -> Iterator[Any]:
            stream = actor.run.options(num_returns="streaming").remote(task, state)
            for ref in stream:
                try:
                    event = ray.get(ref)
                    yield event  # resumed by the slot once a part is stored
                    if isinstance(event, PartResult):
                        actor.ack.remote()
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, (ChunkError, EncodeError)):
                        raise cause from None
                    raise _WorkerError(f"{type(cause).__name__ if cause else 'error'}: {_cause(exc)}") from None

        return run

    def _recoverer(self, actor: Any, timeout: float = 900.0) -> Any:
        ray = self.ray

        def recover() -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    ray.get(actor.ping.remote(), timeout=60)
                    return True
                except ray.exceptions.ActorDiedError:
                    return False
                except Exception:
                    time.sleep(1.0)
            return False

        return recover

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors.clear()
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


class _WorkerError(RuntimeError):
    """An unexpected error inside a worker (out of GPU memory, a driver fault): the chunk is retried elsewhere."""


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    ex = ray.exceptions
    kinds = [_WorkerError, ex.RayActorError, ex.WorkerCrashedError, ex.ObjectLostError]
    for name in ("ActorUnavailableError", "NodeDiedError", "OwnerDiedError", "ObjectReconstructionFailedError"):
        if hasattr(ex, name):
            kinds.append(getattr(ex, name))
    return tuple(kinds)


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return _first_line(cause if isinstance(cause, BaseException) else exc)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines and "Traceback" in lines[0] else (lines[0] if lines else type(exc).__name__))[:300]

"""The workers of one encode, started in the background so that loading the models and their warm-up (the
compile, minutes on a GPU) overlap the scene detection: one in this process (``--workers 1``), or Ray actors
(``--workers N``, ``--ray-address``)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any

from .errors import EncodeError
from .scheduler import Events, ThreadSlot
from .worker import KILL_ENV, LOG_ENV, Engine, JobSpec

__all__ = ["WorkerPool"]


class WorkerPool:
    """Start with :meth:`start`; :meth:`slots` waits until every worker is ready; :meth:`close` stops them."""

    def __init__(self) -> None:
        self.cluster: Any = None
        self._local: Future[Engine] | None = None
        self._threads_before = 0
        self._reader: Any = None

    @classmethod
    def start(cls, *, workers: int | None, ray_address: str | None, device: str, dtype: str, model_dir: str | None,
              cpu_threads: int | None, spec: JobSpec, source: tuple[str, str, tuple[int, int] | None],
              clip: Any) -> "WorkerPool":
        """Begin starting the workers. ``workers`` None: 1 here, or every GPU of the cluster at ``ray_address``.
        ``clip`` is the opened source (read in this process by the local worker)."""
        self = cls()
        n = workers if workers is not None else (0 if ray_address else 1)
        if n == 1 and not ray_address:
            from vsstreamdiffvsr import StreamDiffVSR
            from vsstreamdiffvsr.filter.frames import stdout_to_stderr

            from .source import FrameReader

            if device == "cpu" and cpu_threads:
                import torch

                self._threads_before = torch.get_num_threads()
                torch.set_num_threads(cpu_threads)

            def build() -> Engine:
                with stdout_to_stderr():
                    pipe = StreamDiffVSR.from_pretrained(model_dir, device=device, dtype=dtype)
                engine = Engine(pipe, spec, str(pipe.device))
                engine.warm_up()
                return engine

            self._reader = FrameReader(clip)
            future: Future[Engine] = Future()

            def body() -> None:
                try:
                    future.set_result(build())
                except BaseException as exc:
                    future.set_exception(exc)

            # a daemon thread: Ctrl-C during a long warm-up (a GPU's compile) does not wait for it to end
            threading.Thread(target=body, daemon=True, name="vsstreamdiffvsr-load").start()
            self._local = future
            return self
        from .cluster import RayCluster

        self.cluster = RayCluster.connect(ray_address, max(1, n), device)
        if n == 0:
            n = self.cluster.gpu_count() if device == "cuda" else 1
            if n < 1:
                self.close()
                raise EncodeError(f"the Ray cluster at {ray_address} has no GPU; pass --device cpu --workers N to "
                                  "run on its CPUs")
        hooks = {k: os.environ[k] for k in (KILL_ENV, LOG_ENV) if k in os.environ}
        threads = (cpu_threads or max(1, (os.cpu_count() or 1) // n)) if device == "cpu" else None
        self.cluster.start_workers(workers=n, device=device, spec=spec, model_dir=model_dir,
                                   options={"device": device, "dtype": dtype}, source=source, hooks=hooks,
                                   threads=threads)
        return self

    def slots(self, events: Events) -> list[ThreadSlot]:
        """The workers' slots, once they are ready; EncodeError (or the pipeline's own error) if one cannot start."""
        if self._local is not None:
            try:
                engine = self._local.result()
            except EncodeError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise EncodeError(f"the model could not be loaded: {first}", 1) from None
            reader = self._reader
            return [ThreadSlot(engine.name, events, lambda task, state: engine.run(task, reader.read, state))]
        return self.cluster.slots(events)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self._threads_before:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = 0

"""Where frames run: one lock per model, one worker thread per GPU for CUDA-graph pipelines, the process-wide
cuDNN/TF32 flags set only while a frame runs, and the one-line notices before a compile."""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .compiling import cudagraph_tree_tls

__all__ = ["Runtime", "Worker", "run_flags"]


class Worker:
    """One thread that runs graphed pipelines' frames (calls from that thread itself run in place).

    One per device for the whole process (:meth:`for_device`): torch's CUDA-graph trees are per thread, so every
    pipeline compiled with CUDA graphs on a device shares one tree of graphs and one memory pool.
    """

    _by_device: dict[torch.device, "Worker"] = {}
    _lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device) -> "Worker":
        with cls._lock:
            if device not in cls._by_device:
                cls._by_device[device] = cls(device)
            return cls._by_device[device]

    def __init__(self, device: torch.device) -> None:
        self._ident: int | None = None
        self._device = device
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsstreamdiffvsr",
                                                           initializer=self._started)

    def _started(self) -> None:
        self._ident = threading.get_ident()
        if self._device.type == "cuda" and self._device.index is not None:
            torch.cuda.set_device(self._device)  # graph capture and syncs without a device use the current one
        cudagraph_tree_tls()

    @property
    def thread_name(self) -> str | None:
        return next((t.name for t in threading.enumerate() if t.ident == self._ident), None)

    def on_it(self) -> bool:
        return threading.get_ident() == self._ident

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._pool.submit(fn, *args, **kwargs).result()


class Runtime:
    """The lock that serialises one model's frames, the worker thread (CUDA-graph modes), the flags and the
    compile notices; shared by every view of a model."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lock = threading.RLock()
        self._announced: set[tuple[Any, ...]] = set()

    def worker(self, graphs: bool) -> Worker | None:
        return Worker.for_device(self.device) if graphs else None

    def call(self, worker: Worker | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on ``worker``'s thread (in place without one, or when already there). A caller holding this
        model's lock (a callback reaching another view) would wait on it forever: refused with a plain error."""
        if worker is None or worker.on_it():
            return fn(*args, **kwargs)
        if self.lock._is_owned():  # type: ignore[attr-defined]  # RLock's own test of its holder
            raise RuntimeError("vsstreamdiffvsr: a CUDA-graph pipeline was called while this thread holds the "
                               "model's lock (from a process_frame callback, or inside `with pipe.lock`); call it "
                               "after that returns")
        return worker.run(fn, *args, **kwargs)

    @contextlib.contextmanager
    def frame(self, cudnn_benchmark: bool) -> Iterator[None]:
        """The lock, cuDNN autotuning as asked, and TF32 float32 matmuls on CUDA (as the reference runs)."""
        with self.lock, run_flags(cudnn_benchmark, self.device.type == "cuda"):
            yield

    def announce(self, key: tuple[Any, ...], what: str, lr_size: tuple[int, int]) -> None:
        """One line on stderr (never stdout: vspipe writes the video there) before ``what`` compiles for a new
        size, so a first run does not look hung."""
        if key in self._announced:
            return
        self._announced.add(key)
        sys.stderr.write(f"vsstreamdiffvsr: compiling {what} for {lr_size[1]}x{lr_size[0]} input; the first time "
                         "on a machine this takes a few minutes, later runs reuse the kernel cache\n")
        sys.stderr.flush()


_FLAGS_LOCK = threading.Lock()
_flags_users = 0
_flags_saved: tuple[bool, tuple[str, Any]] | None = None


def _get_tf32() -> tuple[str, Any]:
    """("legacy", allow_tf32) or, once the process chose torch's newer API, ("new", fp32_precision): reading
    the legacy flag after the new one was set raises, and writing it would break the user's later reads."""
    matmul = torch.backends.cuda.matmul
    try:
        return "legacy", matmul.allow_tf32
    except RuntimeError:  # "mix of the legacy and new APIs"
        return "new", matmul.fp32_precision


def _set_tf32(api: str, value: Any) -> None:
    matmul = torch.backends.cuda.matmul
    if api == "legacy":
        matmul.allow_tf32 = bool(value)
    else:
        matmul.fp32_precision = value if isinstance(value, str) else ("tf32" if value else "ieee")


@contextlib.contextmanager
def run_flags(cudnn_benchmark: bool, tf32: bool) -> Iterator[None]:
    """Set cuDNN autotuning and TF32 matmuls for the block, then restore the caller's values.

    The flags are process-wide, and pipelines with locks of their own (two GPUs, two dtypes) may run at
    once: the values from before the first block are saved and restored when the last block ends, under a
    lock; in between, the block entered last sets them.
    """
    global _flags_users, _flags_saved
    with _FLAGS_LOCK:
        if _flags_users == 0:
            _flags_saved = (torch.backends.cudnn.benchmark, _get_tf32())
        _flags_users += 1
        assert _flags_saved is not None
        torch.backends.cudnn.benchmark = cudnn_benchmark
        _set_tf32(_flags_saved[1][0], tf32)
    try:
        yield
    finally:
        with _FLAGS_LOCK:
            _flags_users -= 1
            if _flags_users == 0 and _flags_saved is not None:
                benchmark, (api, value) = _flags_saved
                torch.backends.cudnn.benchmark = benchmark
                _set_tf32(api, value)
                _flags_saved = None

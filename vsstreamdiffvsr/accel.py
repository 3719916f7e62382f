"""Speed tools that live outside the model code: the on-disk compile cache, cuDNN/TF32 flags, graphed calls."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["compile_cache", "run_flags", "GraphedCall"]


#: the user's own TORCHINDUCTOR_CACHE_DIR, read at import: torch writes its /tmp default into the environment
#: the first time inductor runs, which must not pass for a choice of the user's
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def compile_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Point TorchInductor's (and Triton's) kernel caches at a persistent folder; returns it.

    Default: ``<per-user cache>/vsstreamdiffvsr/inductor`` (beside the default model folder), so a
    second run skips most compile time. An explicit ``TORCHINDUCTOR_CACHE_DIR`` is left alone.
    """
    from .weights import user_cache_dir

    if cache_dir is None and _USER_INDUCTOR_CACHE:
        return Path(_USER_INDUCTOR_CACHE)
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "inductor"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except Exception:  # an inductor without the option: the env vars still apply
        pass
    return root


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

    ``cudnn_benchmark``: cuDNN times its convolution algorithms once per new shape and keeps the fastest;
    our shapes are static per clip, so that cost is paid on the first frames only. ``tf32``: float32
    matmuls (RAFT's correlation, the float32 path's attention) on the tensor cores, as the reference's
    inference script runs them (cuDNN convolutions use TF32 by torch's default already).

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


class GraphedCall:
    """``fn`` of fixed-shape CUDA tensors, recorded once as a CUDA graph with a memory pool of its own.

    A call copies its arguments into the graph's input buffers, replays the graph on the current stream
    (one launch instead of the thousand or so that RAFT's 12 updates make) and returns a copy of the
    output, which the next replay would overwrite. Recording happens on the current stream, which must not
    be the default stream, after ``warmup`` eager runs (cuDNN autotuning and lazy initialisation must not
    happen while recording). The pool is private, so this graph may replay on one stream while
    torch.compile's CUDA graphs, which share a pool of their own, replay on another.

    Construction raises whatever recording raised (out of memory, an operation a graph cannot hold);
    the caller falls back to calling ``fn``.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor, warmup: int = 2) -> None:
        self.inputs = [a.clone() for a in args]
        for _ in range(warmup):
            fn(*self.inputs)
        self.graph = self._new_graph()
        with self._recording(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) != len(self.inputs):
            raise TypeError(f"expected {len(self.inputs)} tensors, got {len(args)}")
        for buf, a in zip(self.inputs, args):
            if a.shape != buf.shape:
                raise ValueError(f"a graphed call's inputs keep their shape: {tuple(buf.shape)}, got {tuple(a.shape)}")
            buf.copy_(a)
        self._replay()
        return self.output.clone()

    # the three CUDA-specific operations, apart so that a test can stand in for them on the CPU
    def _new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def _recording(self, graph: Any) -> contextlib.AbstractContextManager[Any]:
        # thread_local: a VapourSynth thread converting a frame meanwhile must not invalidate the recording
        return torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local")

    def _replay(self) -> None:
        self.graph.replay()

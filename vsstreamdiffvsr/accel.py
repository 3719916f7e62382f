"""Speed tools that live outside the model code: the on-disk compile cache, cuDNN/TF32 flags, graphed calls."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["compile_cache", "run_flags", "GraphedCall"]


def compile_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Point TorchInductor's (and Triton's) kernel caches at a persistent folder; returns it.

    Default: ``<per-user cache>/vsstreamdiffvsr/inductor`` (beside the default model folder), so a
    second run skips most compile time. An explicit ``TORCHINDUCTOR_CACHE_DIR`` is left alone.
    """
    from .weights import user_cache_dir

    if cache_dir is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
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


@contextlib.contextmanager
def run_flags(cudnn_benchmark: bool, tf32: bool) -> Iterator[None]:
    """Set cuDNN autotuning and TF32 matmuls for the block, then restore the caller's values.

    ``cudnn_benchmark``: cuDNN times its convolution algorithms once per new shape and keeps the fastest;
    our shapes are static per clip, so that cost is paid on the first frames only. ``tf32``: float32
    matmuls (RAFT's correlation, the float32 path's attention) on the tensor cores, as the reference's
    inference script runs them (cuDNN convolutions use TF32 by torch's default already). The flags are
    process-wide: callers hold the pipeline's lock, so our own calls never race on them.
    """
    previous = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = previous


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

"""Speed tools that live outside the model code: the on-disk compile cache, cuDNN/TF32 flags, graphed calls,
the eager fallback of compiled functions and the one thread per GPU that replays torch.compile's CUDA graphs."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CompileFallbackWarning

__all__ = ["compile_cache", "run_flags", "GraphedCall", "Worker", "CompileFallback", "check_compiler", "own_outputs",
           "cudagraph_tree_tls", "is_compile_failure"]


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


class Worker:
    """One thread that runs graphed pipelines' frames (calls from that thread itself run in place).

    One per device for the whole process (:meth:`for_device`): every pipeline compiled with CUDA graphs on
    a device shares one tree of graphs and one memory pool instead of recording its own on a thread of
    its own.
    """

    _by_device: dict[torch.device, "Worker"] = {}
    _lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device) -> "Worker":
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0": one device, one worker
            device = torch.device("cuda", torch.cuda.current_device())
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

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args).result()


def cudagraph_tree_tls() -> None:
    """Give this thread the thread-local state torch.compile's CUDA-graph trees look up.

    torch before 2.13 sets it up only on the thread that first imports the module (and on autograd's
    threads): on any other Python thread a graphed call fails on an assertion (pytorch#123177; seen on
    torch 2.11 as soon as a second pipeline's worker compiled). Later torch does this lazily itself.
    """
    try:
        from torch._inductor import cudagraph_trees as trees
    except Exception:  # an inductor without the module: nothing to prepare
        return
    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)


def check_compiler(device: torch.device, backend: Any) -> None:
    """Up front, rather than as a compiler traceback at the second frame: inductor on CUDA needs Triton, which
    PyPI's torch for Windows does not bring, and which needs a GPU of compute capability 7.0 or newer."""
    if device.type != "cuda" or backend != "inductor":
        return
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # a torch without the helper: the compile's own error, if any, is left to speak
        return
    if not has_triton():
        raise ValueError("torch.compile on CUDA (compile=True, compile_flow=True) needs Triton, which this torch "
                         "installation lacks or cannot use with this GPU (compute capability 7.0 or newer is "
                         "needed); install it (pip install triton, on Windows triton-windows) or leave compiling "
                         "off (compile=False, compile_flow=False)")


class CompileFallback:
    """The functions of one compile set, each with its eager original: the first compile failure among them
    (a compiler or Triton problem on this machine) warns once and turns them all eager for good.

    Out-of-memory errors are not compile failures: they propagate, for the out-of-memory fallback to tile.
    """

    def __init__(self, what: str, off: str) -> None:
        self.what, self.off = what, off  # what is compiled; the option that turns its compile off
        self.failed = False

    def wrap(self, compiled: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.failed:
                try:
                    return compiled(*args, **kwargs)
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:
                    if not is_compile_failure(exc):
                        raise
                    oom = _out_of_memory_inside(exc)
                    if oom is not None:
                        raise oom from exc
                    inner = getattr(exc, "inner_exception", None)
                    self.failed = True
                    reason = (str(inner or exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    warnings.warn(f"vsstreamdiffvsr: torch.compile failed for {self.what} ({reason}); running it "
                                  f"eagerly from now on (same result, slower; {self.off} skips the attempt)",
                                  CompileFallbackWarning, stacklevel=2)
            return eager(*args, **kwargs)

        return call


def _out_of_memory_inside(exc: BaseException) -> torch.OutOfMemoryError | None:
    """The out-of-memory error a compiler's exception wraps, if any: inductor hands it on as
    ``inner_exception``, dynamo's own wrappers as the cause (a short chain; cycles are cut)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [getattr(exc, "inner_exception", None), exc.__cause__]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError):
            return e
        todo += [getattr(e, "inner_exception", None), e.__cause__]
    return None


def is_compile_failure(exc: BaseException) -> bool:
    """A compiler's failure (inductor, Triton, a C++ compiler; dynamo's own bugs), not the model's."""
    from torch._dynamo import exc as dynamo_exc

    return isinstance(exc, (dynamo_exc.BackendCompilerFailed, dynamo_exc.InternalTorchDynamoError))


def own_outputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """For CUDA-graph compile modes: each call starts a new graph generation and returns copies.

    A replayed graph writes its outputs into memory that the next replay (of any graph in the tree) may
    reuse; our outputs are small next to the work (a latent, TPM features, one HR frame), so copying them
    makes every result safe to keep, in any order of calls.
    """
    def call(*args: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)
        return [t.clone() for t in out] if isinstance(out, (list, tuple)) else out.clone()

    return call

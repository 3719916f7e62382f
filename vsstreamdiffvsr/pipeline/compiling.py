"""torch.compile for the pipeline: the on-disk kernel cache, the compiler check, the eager fallback of a compiled
function and the output copies that CUDA-graph modes need."""

from __future__ import annotations

import collections
import os
import stat
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CompileFallbackWarning

__all__ = ["compile_cache", "check_compiler", "CompileFallback", "is_compile_failure", "own_outputs",
           "cudagraph_tree_tls", "compiled"]

#: the torch.compile backend of every compiled function (tests set "aot_eager" to run compiled paths on the CPU)
BACKEND: Any = "inductor"

def _users_cache_setting() -> str | None:
    """``$TORCHINDUCTOR_CACHE_DIR`` if the user set it: torch writes its own /tmp default into the environment
    when dynamo is first imported (our RAFT wrapper's import does that), which must not pass for a choice."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except Exception:  # an inductor without the helper: take the value as the user's
        return value
    return None if os.path.normpath(value) == os.path.normpath(default_cache_dir()) else value


def compile_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Point TorchInductor's (and Triton's) kernel caches at a persistent folder; returns it.

    Default: ``<per-user cache>/vsstreamdiffvsr/inductor``, so a second run skips most compile time. An explicit
    ``TORCHINDUCTOR_CACHE_DIR`` is left alone. The folder is made private (0700); an existing one that others
    can write to and that is not ours is refused: kernels read from it are code this process would run.
    """
    from ..weights import user_cache_dir

    users = _users_cache_setting()
    if cache_dir is None and users:
        return Path(users)
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "inductor"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = root.stat()
    except OSError as exc:
        raise ValueError(f"compile cache folder {root}: {exc.strerror or exc}; pass compile_cache_dir= a "
                         "writable folder") from None
    uid = os.getuid() if hasattr(os, "getuid") else None
    # (a sticky folder such as /tmp too: others cannot delete our files there, but can make the subfolders the
    # caches read before we do)
    if uid is not None and info.st_uid != uid and info.st_mode & (stat.S_IWOTH | stat.S_IWGRP):
        raise ValueError(f"compile cache folder {root} belongs to another user and others can write to it; "
                         "compiled kernels loaded from it would run as you: pass compile_cache_dir= a folder of "
                         "your own")
    if uid is not None and info.st_uid == uid and info.st_mode & 0o077:
        root.chmod(0o700)  # made by an earlier version, or under umask 000
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except Exception:  # an inductor without the option: the env vars still apply
        pass
    return root


def check_compiler(device: torch.device, backend: Any = "inductor") -> None:
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


def compiled(fns: dict[str, Callable[..., Any]], *, what: str, off: str, mode: str | None, backend: Any,
             graphs: bool) -> dict[str, Callable[..., Any]]:
    """``torch.compile`` each of ``fns`` (static shapes) behind one :class:`CompileFallback`; ``graphs``: the
    mode replays CUDA graphs, so each call gets :func:`own_outputs`."""
    opts: dict[str, Any] = dict(dynamic=False, backend=backend, fullgraph=False)
    if backend == "inductor" and mode is not None:
        opts["mode"] = mode
    fallback = CompileFallback(what, off)
    wrap = own_outputs if graphs else (lambda fn: fn)
    return {name: fallback.wrap(wrap(torch.compile(fn, **opts)), fn) for name, fn in fns.items()}


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


def cudagraph_tree_tls() -> None:
    """Give this thread the thread-local state torch.compile's CUDA-graph trees look up.

    torch before 2.13 sets it up only on the thread that first imports the module (and on autograd's
    threads): on any other Python thread a graphed call fails on an assertion (pytorch#123177). Later torch
    does this lazily itself.
    """
    try:
        from torch._inductor import cudagraph_trees as trees
    except Exception:  # an inductor without the module: nothing to prepare
        return
    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)

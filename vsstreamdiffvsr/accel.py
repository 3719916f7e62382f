"""Speed settings that live outside the model code: the on-disk compile cache, cuDNN/TF32 flags."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["compile_cache", "run_flags"]


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

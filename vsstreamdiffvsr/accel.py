"""Speed settings that live outside the model code: the on-disk compile cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["compile_cache"]


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

"""Model folders for the ComfyUI loader, and loading a pipeline that ComfyUI can drop (no ComfyUI imports).

The loader lists the sub-folders of ComfyUI's ``stream_diffvsr`` model folders (``models/stream_diffvsr/``
and any that ``extra_model_paths.yaml`` adds), each one a model folder in the Hugging Face layout that
``python -m vsstreamdiffvsr download --dir <folder>`` fills.

A loaded pipeline is held only by what the loader node returns, which ComfyUI keeps in its node cache: when
ComfyUI frees that cache ("Free model and node cache", or ``POST /free`` with ``free_memory``), the pipeline
is garbage-collected and its memory released. Loaders with the same settings share one pipeline while it lives
(a weak registry: it never keeps one alive by itself).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import NodeError, first_line

__all__ = ["MODEL_FOLDER", "DTYPES", "FLOWS", "PipeHandle", "model_names", "find_model", "load_pipe", "live_pipes"]

#: the folder name under ComfyUI's models/ (and the key in extra_model_paths.yaml)
MODEL_FOLDER = "stream_diffvsr"
DTYPES = ("auto", "float32", "float16", "bfloat16")
FLOWS = ("hr", "lr")

log = logging.getLogger("vsstreamdiffvsr.comfyui")

_LOCK = threading.Lock()
_LIVE: "weakref.WeakValueDictionary[tuple[str, ...], Any]" = weakref.WeakValueDictionary()


@dataclass(frozen=True, eq=False)
class PipeHandle:
    """The STREAMDIFFVSR_PIPE the loader returns: the pipeline and how it was loaded."""

    pipe: Any  # a vsstreamdiffvsr.StreamDiffVSR
    name: str
    device: torch.device
    dtype: str


def model_names(bases: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Sorted names of the model folders (non-hidden sub-folders) in ``bases``; the first base wins a name."""
    names: set[str] = set()
    for base in bases:
        try:
            entries = list(os.scandir(base))
        except OSError:  # a configured folder that does not exist (yet)
            continue
        names.update(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    return sorted(names)


def find_model(name: str, bases: Iterable[str | os.PathLike[str]]) -> Path:
    """The folder called ``name`` in the first of ``bases`` that has one; NodeError naming the fix otherwise."""
    bases = [Path(b) for b in bases]
    if not name or Path(name).name != name or name in (".", ".."):
        raise NodeError(f"model name {name!r} is not a folder name; pick one of the folders in "
                        f"{', '.join(map(str, bases))}")
    for base in bases:
        if (base / name).is_dir():
            return (base / name).resolve()
    where = ", ".join(str(b) for b in bases) or f"models/{MODEL_FOLDER}"
    raise NodeError(f"model folder {name!r} not found in {where}; download it with `python -m vsstreamdiffvsr "
                    f"download --dir {bases[0] / name if bases else name}`")


def _key(model_dir: Path, device: torch.device, dtype: str, flow: str, compile: bool) -> tuple[str, ...]:
    return (str(model_dir), str(device), dtype, flow, str(compile))


def load_pipe(model_dir: Path, *, name: str, device: torch.device, dtype: str = "auto", flow: str = "hr",
              compile: bool = False) -> PipeHandle:
    """Load (or share, while it lives) the pipeline of ``model_dir`` on ``device``.

    Args:
        model_dir: a model folder (see :func:`find_model`).
        name: the name shown in messages.
        device: where the pipeline runs.
        dtype: ``"auto"`` (float16 on CUDA, float32 elsewhere), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        flow: ``"hr"`` (the reference) or ``"lr"`` (faster; needs frames of at least 128 px per side).
        compile: ``torch.compile`` the pipeline (slow first frames, then faster on CUDA).

    Raises:
        NodeError: a missing or broken model folder, or a bad option (one line with the fix).
    """
    if dtype not in DTYPES:
        raise NodeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if flow not in FLOWS:
        raise NodeError(f"flow must be one of {', '.join(FLOWS)}, got {flow!r}")
    key = _key(model_dir, device, dtype, flow, compile)
    with _LOCK:
        pipe = _LIVE.get(key)
        if pipe is None:
            from .. import StreamDiffVSR

            try:
                pipe = StreamDiffVSR.from_pretrained(model_dir, device=device,
                                                     dtype=None if dtype == "auto" else dtype,
                                                     flow=flow, compile=compile)
            except Exception as exc:  # ModelFilesError (says how to fix the folder), a bad device...
                raise NodeError(f"cannot load Stream-DiffVSR model {name!r}: {first_line(exc)}") from None
            _LIVE[key] = pipe
            log.info("Stream-DiffVSR: loaded model %r on %s (dtype %s)", name, device, dtype)
            weakref.finalize(pipe, log.info, "Stream-DiffVSR: released model %r (%s)", name, device)
    return PipeHandle(pipe, name, device, dtype)


def live_pipes() -> int:
    """How many loaded pipelines are alive (for tests and diagnostics)."""
    with _LOCK:
        return len(_LIVE)

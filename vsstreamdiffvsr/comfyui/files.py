"""Files the nodes write and read: stream states and lossless frame batches, as safetensors (no ComfyUI imports).

A state file is :meth:`StreamState.save`'s format; it holds the padded frame size only (see :class:`NodeState`).
A frames file holds one float32 tensor ``"images"``, (B, H, W, 3) in [0, 1]: ComfyUI's IMAGE batch, unrounded.
Files are written under a temporary name and renamed when complete, so a file that is listed is a whole one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..state import StreamState
from .errors import NodeError, first_line
from .frames import NodeState

__all__ = ["STATE_FOLDER", "SUFFIX", "FRAMES_FORMAT", "list_states", "write_state", "read_state", "write_frames"]

#: the folder under ComfyUI's output directory that holds saved states
STATE_FOLDER = "stream_diffvsr_states"
SUFFIX = ".safetensors"
FRAMES_FORMAT = "vsstreamdiffvsr.comfyui.frames/1"


def list_states(folder: str | os.PathLike[str]) -> list[str]:
    """Sorted paths (with ``/``, relative to ``folder``) of the state files in ``folder`` and its sub-folders."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{SUFFIX}") if p.is_file())


def _write_whole(path: Path, write: Callable[[Path], None], what: str) -> Path:
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        os.replace(partial, path)
    except Exception as exc:  # OSError, or safetensors' own error
        partial.unlink(missing_ok=True)
        raise NodeError(f"cannot write the {what} file {path}: {first_line(exc)}") from None
    return path


def write_state(state: NodeState, path: str | os.PathLike[str]) -> Path:
    """Save ``state`` to ``path`` (complete or not at all); NodeError if it cannot be written."""
    return _write_whole(Path(path), state.stream.save, "state")


def write_frames(images: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Save an IMAGE batch losslessly (float32) to ``path`` (complete or not at all); NodeError if it cannot."""
    from safetensors.torch import save_file

    data = {"images": images.detach().to(device="cpu", dtype=torch.float32).contiguous()}
    return _write_whole(Path(path), lambda p: save_file(data, os.fspath(p), metadata={"format": FRAMES_FORMAT}),
                        "frames")


def read_state(folder: str | os.PathLike[str], name: str) -> NodeState:
    """The state saved as ``name`` (relative to ``folder``), on the CPU; NodeError naming the fix otherwise."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if root not in path.parents or path.suffix != SUFFIX:
        raise NodeError(f"state file {name!r} is not a {SUFFIX} file inside {root}")
    if not path.is_file():
        raise NodeError(f"state file {name!r} not found in {root}; save one with the Save State node first")
    try:
        stream = StreamState.load(path, "cpu")
    except ValueError as exc:
        raise NodeError(f"state file {name!r}: {first_line(exc)}") from None
    return NodeState(stream)

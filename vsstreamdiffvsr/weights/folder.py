"""Where the model folder is: the argument, ``$VSSTREAMDIFFVSR_MODEL_DIR`` or the user cache; where RAFT is."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch

from ..models.flow import RAFT_FILENAME
from .layout import ENV_MODEL_DIR
from .problems import ModelFilesError, _short


def user_cache_dir() -> Path:
    """The per-user cache folder of this package (XDG on Linux, Caches on macOS, LOCALAPPDATA on Windows)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the spec: ignore a relative one
    return base / "vsstreamdiffvsr"


def default_model_dir() -> Path:
    """``$VSSTREAMDIFFVSR_MODEL_DIR`` if set, else ``<user cache>/vsstreamdiffvsr/models``."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env).expanduser()
    return user_cache_dir() / "models"


def _as_path(model_dir: object) -> Path:
    """``model_dir`` as a Path; TypeError / ValueError naming the argument when it is not a usable path."""
    if isinstance(model_dir, (str, os.PathLike)) and not isinstance(model_dir, bool):
        text = os.fspath(model_dir)
        if isinstance(text, str):
            if not text:
                raise ValueError("model_dir is an empty string; give a folder, or None for the default folder")
            if "\0" in text:
                raise ValueError(f"model_dir {text!r} contains a NUL character")
            return Path(text)
    raise TypeError(f"model_dir must be a path (str or os.PathLike), got {type(model_dir).__name__}")


def resolve_model_dir(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """The absolute folder to use: the argument (``~`` expanded), else :func:`default_model_dir`.

    Raises TypeError (or ValueError) when ``model_dir`` is not a path, ModelFilesError when the path cannot
    be resolved (a symbolic link loop, an unknown home folder...). The folder need not exist.
    """
    origin = ""
    try:
        if model_dir is None:
            origin = f" (from ${ENV_MODEL_DIR})" if os.environ.get(ENV_MODEL_DIR) else ""
            path = default_model_dir()
        else:
            path = _as_path(model_dir)
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # 3.12 raises RuntimeError for a loop, 3.13 OSError(ELOOP)
        given = model_dir if model_dir is not None else os.environ.get(ENV_MODEL_DIR)
        shown = os.path.abspath(os.fspath(given)) if isinstance(given, (str, os.PathLike)) else "the default folder"
        loop = "loop" in str(exc).lower() or getattr(exc, "errno", None) == errno.ELOOP
        why = ("a symbolic link in it leads back to itself (symbolic link loop)" if loop
               else _short(exc).split(": ", 1)[-1])
        raise ModelFilesError(f"model folder {shown}{origin} cannot be used: {why}; fix: give a folder path that "
                              "exists or can be created") from None


def find_raft_weights(model_dir: Path) -> Path | None:
    """``<model_dir>/raft/<file>``, else torch hub's checkpoint folder, else None."""
    for candidate in (model_dir / "raft" / RAFT_FILENAME, Path(torch.hub.get_dir()) / "checkpoints" / RAFT_FILENAME):
        if candidate.is_file():
            return candidate
    return None

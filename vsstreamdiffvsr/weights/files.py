"""Reading one file of the model folder: it must be a regular file; a JSON object; a whole safetensors file.

The folder's readers (``_regular_file``, ``_read_json``, ``_header``) raise :class:`ModelFilesError` naming the
file (relative to the folder) and what is wrong; :func:`read_safetensors_header`, which takes any path, raises
ValueError.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from .layout import MAX_CONFIG_BYTES
from .problems import _fail, _short


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header; ValueError if the file is not whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("file is too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 512 * 1024 * 1024:
            raise ValueError("header length is larger than the file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("header is not valid JSON (corrupt or not safetensors)") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"header entry {name!r} is malformed") from None
    if 8 + n + end > size:
        raise ValueError(f"file is truncated ({size} bytes, header promises {8 + n + end})")
    if 8 + n + end < size:
        raise ValueError(f"file has {size - 8 - n - end} trailing bytes (corrupt)")
    return out


def _regular_file(model_dir: Path, rel: str) -> os.stat_result:
    """The stat of ``model_dir / rel`` (links followed); ModelFilesError if it is missing or not a file."""
    try:
        st = os.stat(model_dir / rel)
    except (FileNotFoundError, NotADirectoryError):
        raise _fail(model_dir, f"{rel} is missing") from None
    except OSError as exc:
        raise _fail(model_dir, f"{rel} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(model_dir, f"{rel} is not a regular file")
    return st


def _read_json(model_dir: Path, rel: str) -> dict[str, Any]:
    size = _regular_file(model_dir, rel).st_size
    if size > MAX_CONFIG_BYTES:
        raise _fail(model_dir, f"{rel} is {size} bytes, larger than any config ({MAX_CONFIG_BYTES} at most)")
    try:
        data = json.loads((model_dir / rel).read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(model_dir, f"{rel} cannot be read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, too many digits, nesting too deep
        raise _fail(model_dir, f"{rel} is not valid JSON ({_short(exc)})") from None
    if not isinstance(data, dict):
        raise _fail(model_dir, f"{rel} is not a JSON object")
    return data


def _header(model_dir: Path, rel: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    path = model_dir / rel
    _regular_file(model_dir, rel)
    try:
        return read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        raise _fail(model_dir, f"{rel} is corrupt: {exc}") from None

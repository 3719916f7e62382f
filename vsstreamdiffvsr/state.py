"""StreamState: everything Stream-DiffVSR carries from one frame to the next."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from dataclasses import dataclass

import torch

__all__ = ["StreamState"]

_FORMAT = "vsstreamdiffvsr.StreamState/1"


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: states compare by identity
class StreamState:
    """The recurrent state between frames. Empty (the default) means the next frame is a cold start.

    Attributes:
        prev_hq: raw decoder output of the previous frame, (1,3,4h,4w), nominally [-1, 1] and
            deliberately *not* clamped (the reference warps the unclamped tensor).
        prev_lq: the previous LR input, (1,3,h,w) in [0, 1], float32: what the optical flow needs.
        frame_count: frames processed since the last cold start.

    States are immutable: :meth:`StreamDiffVSR.process_frame` returns a new one, so an old state can
    be kept to re-run a frame.
    """

    prev_hq: torch.Tensor | None = None
    prev_lq: torch.Tensor | None = None
    frame_count: int = 0

    def __post_init__(self) -> None:
        if (self.prev_hq is None) != (self.prev_lq is None):
            raise ValueError("StreamState needs both prev_hq and prev_lq, or neither")
        if self.prev_hq is not None:
            assert self.prev_lq is not None
            for name, t in (("prev_hq", self.prev_hq), ("prev_lq", self.prev_lq)):
                if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[:2]) != (1, 3) \
                        or not t.is_floating_point():
                    what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"StreamState: {name} must be a (1, 3, h, w) float tensor, got {what}")
            if self.prev_hq.shape[-2:] != torch.Size((4 * self.prev_lq.shape[-2], 4 * self.prev_lq.shape[-1])):
                raise ValueError(f"StreamState: prev_hq {tuple(self.prev_hq.shape)} is not 4x prev_lq "
                                 f"{tuple(self.prev_lq.shape)}")
        if not isinstance(self.frame_count, int) or isinstance(self.frame_count, bool) or self.frame_count < 0:
            raise ValueError(f"StreamState: frame_count must be an integer >= 0, got {self.frame_count!r}")

    @property
    def is_cold(self) -> bool:
        """True when the next frame starts a new run (no previous frame)."""
        return self.prev_hq is None

    @property
    def lr_size(self) -> tuple[int, int] | None:
        """(h, w) of the previous LR frame, or None when cold."""
        return None if self.prev_lq is None else (int(self.prev_lq.shape[-2]), int(self.prev_lq.shape[-1]))

    def to(self, device: torch.device | str) -> "StreamState":
        """A state whose tensors live on ``device`` (the same object if nothing moves)."""
        if self.prev_hq is None:
            return self
        assert self.prev_lq is not None
        return StreamState(self.prev_hq.to(device), self.prev_lq.to(device), self.frame_count)

    def clone(self) -> "StreamState":
        """A deep copy (new tensor storage)."""
        if self.prev_hq is None:
            return StreamState(frame_count=self.frame_count)
        assert self.prev_lq is not None
        return StreamState(self.prev_hq.clone(), self.prev_lq.clone(), self.frame_count)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to a safetensors file (no pickle); tensors keep their dtype.

        The file is written under a temporary name in the same folder and renamed over ``path``, so a reader
        never sees half a file and a failed write leaves the previous file (and no temporary file) behind.
        Raises ValueError if ``path`` exists and is not a regular file (a symbolic link, directory, FIFO or
        device is never replaced), OSError if the folder cannot be written.
        """
        from safetensors.torch import save_file

        target = os.fspath(path)
        try:
            kind: str | None = _kind(os.lstat(target).st_mode)
        except FileNotFoundError:
            kind = None  # a new file (or a missing folder, which the temporary file's creation reports)
        except OSError as exc:  # a parent that is a file, a path too long...
            raise type(exc)(exc.errno, f"StreamState.save: cannot write {target} ({exc.strerror})") from None
        if kind is not None and kind != "regular file":
            raise ValueError(f"StreamState.save: {target} exists and is not a regular file (a {kind}); "
                             "give the path of a new or regular file")
        tensors = {}
        if self.prev_hq is not None:
            assert self.prev_lq is not None
            tensors = {"prev_hq": self.prev_hq.detach().contiguous().cpu(),
                       "prev_lq": self.prev_lq.detach().contiguous().cpu()}
        folder, name = os.path.split(os.path.abspath(target))
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:  # O_EXCL: a name of our own; mode 0o666 minus the umask, as for any new file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        except OSError as exc:
            raise type(exc)(exc.errno, f"StreamState.save: cannot write into {folder} ({exc.strerror})") from None
        try:
            save_file(tensors, tmp, metadata={"format": _FORMAT, "frame_count": str(self.frame_count)})
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before the name points at it
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> "StreamState":
        """Read a file written by :meth:`save`; ValueError naming the file if it is not one.

        Only a regular file (or a symbolic link to one) is opened: a FIFO, device or directory is refused
        without being opened. The header is checked before any tensor is read (format, tensor names, float
        dtypes, (1, 3, h, w) shapes with 1 <= h, w <= :data:`MAX_LR_SIDE`, a decimal ``frame_count`` in
        0..:data:`MAX_FRAME_COUNT`); the values must be finite. The tensors are read on the CPU and moved
        to ``device``.
        """
        from safetensors import safe_open

        name = os.fspath(path)
        try:
            kind = _kind(os.stat(name).st_mode)
        except (OSError, ValueError) as exc:  # missing, unreadable folder, a NUL in the name
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
            raise ValueError(f"{name} is not a readable StreamState file ({why})") from None
        if kind != "regular file":
            raise ValueError(f"{name} is not a regular file (a {kind}); give the path of a file written by "
                             "StreamState.save")
        try:
            with safe_open(name, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"{name} is not a saved StreamState")
                header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
                count = _check_header(name, meta, header)
                tensors = {k: f.get_tensor(k) for k in header}
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{name} is not a readable StreamState file ({_first_line(exc)})") from None
        for key, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds no valid StreamState: {key} holds NaN or infinite values")
        try:
            tensors = {k: t.to(device) for k, t in tensors.items()}
        except Exception as exc:  # an unknown or absent device
            raise ValueError(f"cannot move the StreamState of {name} to device {device!r} "
                             f"({_first_line(exc)})") from None
        try:
            return cls(tensors.get("prev_hq"), tensors.get("prev_lq"), count)
        except ValueError as exc:
            raise ValueError(f"{name} holds no valid StreamState ({exc})") from None


#: the largest LR height or width a saved state may have (a 4096x4096 LR frame is far beyond any real use)
MAX_LR_SIDE = 4096
#: the largest frame_count a saved state may have (60 fps for 500 000 years)
MAX_FRAME_COUNT = 10**15
_LOAD_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return what
    return "special file"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:240] if lines else type(exc).__name__


def _check_header(name: str, meta: dict[str, str], header: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """The frame count, after checking the tensors' names, dtypes and shapes from the header alone."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{name} holds no valid StreamState: {what}")

    extra = sorted(set(header) - {"prev_hq", "prev_lq"})
    if extra:
        raise bad(f"unexpected tensors {extra[:3]}")
    for key, (dtype, shape) in sorted(header.items()):
        if dtype not in _LOAD_DTYPES:
            raise bad(f"{key} is stored as {dtype}; a state holds {', '.join(sorted(_LOAD_DTYPES))}")
        if len(shape) != 4 or shape[:2] != (1, 3):
            raise bad(f"{key} has shape {shape}; a state holds (1, 3, h, w)")
    if ("prev_hq" in header) != ("prev_lq" in header):
        raise bad("it needs both prev_hq and prev_lq, or neither")
    if "prev_lq" in header:
        h, w = header["prev_lq"][1][2:]
        if not (1 <= h <= MAX_LR_SIDE and 1 <= w <= MAX_LR_SIDE):
            raise bad(f"prev_lq is {h}x{w}; LR frames are 1..{MAX_LR_SIDE} pixels a side")
        if header["prev_hq"][1][2:] != (4 * h, 4 * w):
            raise bad(f"prev_hq {header['prev_hq'][1]} is not 4x prev_lq {header['prev_lq'][1]}")
    text = meta.get("frame_count")
    if text is None or not re.fullmatch(r"[0-9]{1,16}", text) or int(text) > MAX_FRAME_COUNT:
        raise bad(f"frame_count {text!r} is not a decimal integer in 0..{MAX_FRAME_COUNT}")
    return int(text)

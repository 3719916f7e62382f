"""StreamState: everything Stream-DiffVSR carries from one frame to the next."""

from __future__ import annotations

import os
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
        """Write to a safetensors file (no pickle); tensors keep their dtype."""
        from safetensors.torch import save_file

        tensors = {}
        if self.prev_hq is not None:
            assert self.prev_lq is not None
            tensors = {"prev_hq": self.prev_hq.detach().contiguous().cpu(),
                       "prev_lq": self.prev_lq.detach().contiguous().cpu()}
        save_file(tensors, os.fspath(path), metadata={"format": _FORMAT, "frame_count": str(self.frame_count)})

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> "StreamState":
        """Read a file written by :meth:`save`; ValueError if it is not one."""
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"{path} is not a saved StreamState")
                keys = set(f.keys())
                hq = f.get_tensor("prev_hq") if "prev_hq" in keys else None
                lq = f.get_tensor("prev_lq") if "prev_lq" in keys else None
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is not a readable StreamState file ({exc})") from None
        try:
            count = int(meta.get("frame_count", "0"))
            return cls(hq, lq, count)
        except ValueError as exc:
            raise ValueError(f"{path} holds no valid StreamState ({exc})") from None

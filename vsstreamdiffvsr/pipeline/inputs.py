"""Stage 1, inputs: an LR frame checked once (type, shape, size, values) and padded to the model's grid, and the
initial latent noise of a frame, a pure function of (seed, frame number)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NonFiniteInputError
from ..models.flow import MIN_FLOW_SIDE

__all__ = ["LRFrame", "prepare", "from_planes", "check_size", "initial_latent", "noise_shape", "frame_seed",
           "frame_noise", "MIN_LR_SIDE", "MAX_LR_SIDE", "GRID"]

#: the smallest LR side: RAFT runs at 4x and needs 128 px
MIN_LR_SIDE = MIN_FLOW_SIDE // 4
#: the largest LR side (16384 px out): beyond it one output frame alone no longer fits any GPU's memory
MAX_LR_SIDE = 4096
#: LR sizes are padded (edge replicated) to multiples of this (the latent and TPM's 4x4 pooling)
GRID = 4


@dataclass(frozen=True)
class LRFrame:
    """LR frames ready for the model: ``x`` (B,3,H,W) float32 in [0,1] on the model's device, H and W padded to
    multiples of :data:`GRID`; ``size`` the (h, w) before padding, to which outputs are cropped."""

    x: torch.Tensor
    size: tuple[int, int]

    @property
    def padded(self) -> tuple[int, int]:
        return int(self.x.shape[-2]), int(self.x.shape[-1])

    def crop(self, hq: torch.Tensor, scale: int = 4) -> torch.Tensor:
        h, w = self.size
        return hq if self.padded == self.size else hq[..., : scale * h, : scale * w]


def check_size(h: int, w: int, name: str = "lq") -> None:
    """LR sizes the model can run: at least :data:`MIN_LR_SIDE`, at most :data:`MAX_LR_SIDE` per side."""
    if h < MIN_LR_SIDE or w < MIN_LR_SIDE:
        raise ValueError(f"{name} must be at least {MIN_LR_SIDE}x{MIN_LR_SIDE} (RAFT needs {MIN_FLOW_SIDE} px at "
                         f"4x), got {w}x{h}")
    if h > MAX_LR_SIDE or w > MAX_LR_SIDE:
        raise ValueError(f"{name} must be at most {MAX_LR_SIDE} px per side ({4 * MAX_LR_SIDE} px out), got {w}x{h}; "
                         "split or downscale the picture first")


def check_shape(lq: Any, name: str = "lq", batch: int | None = 1) -> None:
    """Type, shape and size of LR frames (no look at the values: no device sync)."""
    want = "(1,3,h,w)" if batch == 1 else "(B,3,h,w)"
    if not isinstance(lq, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {want}, got {type(lq).__name__}")
    if lq.dim() != 4 or lq.shape[1] != 3 or (batch is not None and lq.shape[0] != batch) or lq.shape[0] < 1:
        raise ValueError(f"{name} must have shape {want}, got {tuple(lq.shape)}")
    if not lq.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0,1], got {lq.dtype} (divide 8-bit data by 255)")
    check_size(int(lq.shape[2]), int(lq.shape[3]), name)


def _pad(x: torch.Tensor) -> torch.Tensor:
    ph, pw = -x.shape[-2] % GRID, -x.shape[-1] % GRID
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x


def prepare(lq: Any, device: torch.device, batch: int | None = 1) -> LRFrame:
    """``lq`` checked (shape, then values in [0, 1] and finite: one device sync), copied to ``device`` in float32,
    contiguous, and padded. The copy is never the caller's buffer, which a reader may refill for the next frame."""
    check_shape(lq, batch=batch)
    x = lq.to(device=device, dtype=torch.float32)
    # a copy, contiguous: kernels round differently for other memory layouts, and the state keeps this tensor
    x = x.clone(memory_format=torch.contiguous_format) if x is lq else x.contiguous()
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteInputError("lq contains NaN or infinite values; fix the source frame")
    if not (lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"lq values must lie in [0,1], got min {lo:.4g}, max {hi:.4g} (clamp the input)")
    return LRFrame(_pad(x), (int(lq.shape[-2]), int(lq.shape[-1])))


def from_planes(planes: np.ndarray, device: torch.device) -> LRFrame:
    """An LR frame from (3, h, w) host planes (a VapourSynth frame's): checked for NaN/Inf on the host, clamped to
    [0, 1] (RGB from YUV overshoots slightly; the model was trained on [0, 1]), moved and padded. The values are
    then known good: no second check on the device."""
    if not np.isfinite(planes).all():  # before the clamp, which would turn +-Inf into 1 and 0
        raise NonFiniteInputError("the frame holds NaN or infinite values")
    check_size(int(planes.shape[-2]), int(planes.shape[-1]), "the frame")
    x = torch.from_numpy(planes)[None].to(device=device, dtype=torch.float32, non_blocking=True)
    return LRFrame(_pad(x.clamp_(0.0, 1.0)), (int(planes.shape[-2]), int(planes.shape[-1])))


def noise_shape(h: int, w: int, channels: int, batch: int = 1) -> tuple[int, int, int, int]:
    """The latent noise shape for LR frames of h x w (padded to the grid)."""
    return batch, channels, h + -h % GRID, w + -w % GRID


def initial_latent(shape: tuple[int, ...], device: torch.device, noise: torch.Tensor | None,
                   generator: torch.Generator | None) -> torch.Tensor:
    """The float32 starting latent: ``noise`` checked, or drawn from ``generator`` (or torch's global RNG)."""
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape {shape}, got {got}")
        if not noise.is_floating_point() or not bool(torch.isfinite(noise).all()):
            # it would make every frame NaN from here on, through the recurrence
            raise NonFiniteInputError("noise must be a float tensor without NaN or infinite values")
        return noise.to(device=device, dtype=torch.float32).clone()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device).clone()


def frame_seed(seed: int, n: int) -> int:
    """The 64-bit generator seed for frame ``n``: a pure function of (seed, n)."""
    return int.from_bytes(hashlib.sha256(f"vsstreamdiffvsr:{int(seed)}:{int(n)}".encode()).digest()[:8], "little")


def frame_noise(seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial latent noise for frame ``n`` (float32, CPU): the same on every device and thread count."""
    gen = torch.Generator(device="cpu").manual_seed(frame_seed(seed, n))
    return torch.randn(shape, generator=gen, dtype=torch.float32)

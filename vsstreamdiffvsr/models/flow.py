"""Optical flow for Stream-DiffVSR: bicubic x4 of the LR frames, torchvision RAFT-large, and the warp.

The reference computes the flow *from the current frame to the previous one* at HR, on PyTorch's
bicubic x4 (a = -0.75, ``align_corners=False``, no antialias, no clamp) of the [-1, 1] LR frames,
and warps the previous raw HQ output with a grid normalised by ``(W-1, H-1)`` but sampled with
``align_corners=False`` (so zero flow is *not* the identity: a slight shift and blur toward the
borders, zeros outside). Both quirks are reproduced exactly; the model was trained with them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RAFT_FILENAME", "RAFT_URL", "MIN_FLOW_SIDE", "bicubic_x4", "warp", "build_raft", "RaftFlow"]

#: torchvision's ``Raft_Large_Weights.C_T_SKHT_V2`` (= ``DEFAULT``) file, used by the reference.
RAFT_FILENAME = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
RAFT_URL = f"https://download.pytorch.org/models/{RAFT_FILENAME}"
#: RAFT's smallest correlation level needs at least 128 px per side at the resolution it runs on.
MIN_FLOW_SIDE = 128


def bicubic_x4(x: torch.Tensor) -> torch.Tensor:
    """PyTorch bicubic x4 exactly as the reference calls it (unclamped: values may leave [-1, 1])."""
    return F.interpolate(x, scale_factor=4, mode="bicubic")


_grid_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}


def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (h, w, device, dtype)
    grid = _grid_cache.get(key)
    if grid is None:
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack((gx, gy), 2).float().to(device=device, dtype=dtype)  # (H, W, 2) as x, y
        if len(_grid_cache) > 16:
            _grid_cache.clear()
        _grid_cache[key] = grid
    return grid


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warp ``x`` (N,C,H,W) by ``flow`` (N,2,H,W) in pixels, exactly as the reference.

    The sampling position of pixel (gx, gy) is (gx + u, gy + v), normalised with
    ``2 * p / max(size - 1, 1) - 1`` and sampled bilinearly with ``align_corners=False`` and zero padding.
    """
    if flow.dim() != 4 or flow.shape[1] != 2 or flow.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"flow must be (N,2,{x.shape[-2]},{x.shape[-1]}), got {tuple(flow.shape)}")
    h, w = x.shape[-2:]
    vgrid = _base_grid(h, w, x.device, x.dtype) + flow.permute(0, 2, 3, 1).to(x.dtype)
    vx = 2.0 * vgrid[..., 0] / max(w - 1, 1) - 1.0
    vy = 2.0 * vgrid[..., 1] / max(h - 1, 1) - 1.0
    return F.grid_sample(x, torch.stack((vx, vy), dim=3), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def build_raft() -> nn.Module:
    """An uninitialised torchvision RAFT-large (weights are loaded by the caller)."""
    from torchvision.models.optical_flow import raft_large

    return raft_large(weights=None, progress=False)


class RaftFlow(nn.Module):
    """RAFT-large flow ``current -> previous`` on [-1, 1] frames, 12 refinement updates.

    ``mode="hr"`` (the reference) runs RAFT on the bicubic x4 frames. ``mode="lr"`` is a documented,
    faster deviation: RAFT on the LR frames, the flow upsampled x4 (bilinear) with its values x4.
    """

    def __init__(self, raft: nn.Module, num_flow_updates: int = 12) -> None:
        super().__init__()
        self.raft = raft
        self.num_flow_updates = num_flow_updates

    @classmethod
    def from_file(cls, path: str | Path) -> "RaftFlow":
        raft = build_raft()
        state = torch.load(path, map_location="cpu", weights_only=True)
        raft.load_state_dict(state)
        return cls(raft.eval())

    def forward(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Flow (N,2,H,W) in pixels that maps each pixel of ``current`` to its position in ``previous``."""
        return self.raft(current, previous, num_flow_updates=self.num_flow_updates)[-1]

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

__all__ = ["RAFT_FILENAME", "RAFT_URL", "MIN_FLOW_SIDE", "bicubic_x4", "warp", "build_raft", "RaftFlow",
           "LeanCorrBlock", "corr_pyramid_bytes"]

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


def corr_pyramid_bytes(height: int, width: int, levels: int = 4, itemsize: int = 4) -> int:
    """Bytes of torchvision RAFT's all-pairs correlation pyramid for an input of height x width."""
    n = (height // 8) * (width // 8)
    total, h, w = 0, height // 8, width // 8
    for _ in range(levels):
        total += n * h * w
        h, w = h // 2, w // 2
    return total * itemsize


def _lookup_offsets(radius: int, device: torch.device) -> torch.Tensor:
    """(side*side, 2) offsets in the reference's order: delta[a, b] = (d[a], d[b]) added to (x, y)."""
    side = 2 * radius + 1
    d = torch.linspace(-radius, radius, side, device=device)
    return torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).reshape(side * side, 2)


def _full_corr_block(num_levels: int, radius: int) -> nn.Module:
    """torchvision's CorrBlock, with its lookup offsets built on the device (no host copy).

    torchvision builds them on the CPU and copies them to the GPU at each of the 12 updates; a blocking
    copy from pageable memory stalls the host until the stream drains, which would defeat running the
    flow of the next frame on a side stream while this frame denoises. Same numbers (integer offsets).
    """
    from torchvision.models.optical_flow.raft import CorrBlock

    class DeviceCorrBlock(CorrBlock):
        def index_pyramid(self, centroids_coords: torch.Tensor) -> torch.Tensor:
            b, _, h, w = centroids_coords.shape
            side = 2 * self.radius + 1
            delta = _lookup_offsets(self.radius, centroids_coords.device).view(1, side, side, 2)
            coords = centroids_coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
            levels = []
            for corr_volume in self.corr_pyramid:
                grid = coords + delta
                hl, wl = corr_volume.shape[-2:]
                gx = 2 * grid[..., :1] / (wl - 1) - 1
                gy = 2 * grid[..., 1:] / (hl - 1) - 1 if hl > 1 else grid[..., 1:]
                levels.append(F.grid_sample(corr_volume, torch.cat([gx, gy], dim=-1), mode="bilinear",
                                            align_corners=True).view(b, h, w, -1))
                coords = coords / 2
            return torch.cat(levels, dim=-1).permute(0, 3, 1, 2).contiguous()

    return DeviceCorrBlock(num_levels=num_levels, radius=radius)


class LeanCorrBlock(nn.Module):
    """Drop-in for torchvision's ``CorrBlock`` that never stores the all-pairs correlation volume.

    Average-pooling the volume over the second frame's pixels, and sampling it bilinearly, are both linear
    in the second frame's features, so ``<f1(x), sample(pool_l(f2), p)>`` equals the pyramid lookup of the
    reference block up to float rounding. Memory drops from ``(HW/64)^2`` values (about 4 GB at 1080p,
    67 GB at 4K) to a few feature maps; the price is more arithmetic per refinement step. Lookups are done
    in row chunks of at most ``chunk_bytes`` of sampled features.
    """

    def __init__(self, *, num_levels: int = 4, radius: int = 4, chunk_bytes: int = 256 * 2**20) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.radius = radius
        self.chunk_bytes = chunk_bytes
        self.out_channels = num_levels * (2 * radius + 1) ** 2
        self._fmap1: torch.Tensor | None = None
        self._pyramid: list[torch.Tensor] = []

    def build_pyramid(self, fmap1: torch.Tensor, fmap2: torch.Tensor) -> None:
        if fmap1.shape != fmap2.shape:
            raise ValueError(f"feature maps differ in shape: {tuple(fmap1.shape)} vs {tuple(fmap2.shape)}")
        min_size = 2 * 2 ** (self.num_levels - 1)
        if any(s < min_size for s in fmap1.shape[-2:]):
            raise ValueError(f"feature maps must be at least {min_size} px (inputs {8 * min_size} px)")
        self._fmap1 = fmap1
        self._pyramid = [fmap2]
        for _ in range(self.num_levels - 1):
            self._pyramid.append(F.avg_pool2d(self._pyramid[-1], kernel_size=2, stride=2))

    def index_pyramid(self, centroids_coords: torch.Tensor) -> torch.Tensor:
        assert self._fmap1 is not None, "build_pyramid first"
        f1 = self._fmap1
        b, c, h, w = f1.shape
        side = 2 * self.radius + 1
        delta = _lookup_offsets(self.radius, centroids_coords.device)
        k = side * side
        norm = torch.sqrt(torch.tensor(c)).to(f1.dtype)
        rows = max(1, self.chunk_bytes // max(1, b * c * w * k * f1.element_size()))
        coords = centroids_coords.permute(0, 2, 3, 1)  # (B, h, w, 2) as x, y
        levels = []
        for f2 in self._pyramid:
            hl, wl = f2.shape[-2:]
            grid = coords[:, :, :, None, :] + delta  # (B, h, w, K, 2)
            gx = 2 * grid[..., 0] / (wl - 1) - 1
            gy = 2 * grid[..., 1] / (hl - 1) - 1 if hl > 1 else grid[..., 1]
            grid = torch.stack((gx, gy), dim=-1).reshape(b, h, w * k, 2)
            out = torch.empty(b, h, w, k, device=f1.device, dtype=f1.dtype)
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                sampled = F.grid_sample(f2, grid[:, r0:r1], mode="bilinear", align_corners=True)
                sampled = sampled.view(b, c, r1 - r0, w, k)
                out[:, r0:r1] = (sampled * f1[:, :, r0:r1, :, None]).sum(1) / norm
            levels.append(out)
            coords = coords / 2
        return torch.cat(levels, dim=-1).permute(0, 3, 1, 2).contiguous()


class RaftFlow(nn.Module):
    """RAFT-large flow ``current -> previous`` on [-1, 1] frames, 12 refinement updates.

    ``lean=False`` uses torchvision's all-pairs correlation pyramid, ``lean=True`` the
    :class:`LeanCorrBlock` (same flow up to float rounding, far less memory, more arithmetic).
    """

    def __init__(self, raft: nn.Module, num_flow_updates: int = 12) -> None:
        super().__init__()
        self.raft = raft
        self.num_flow_updates = num_flow_updates
        levels, radius = raft.corr_block.num_levels, raft.corr_block.radius
        self._full_block = _full_corr_block(levels, radius)
        self._lean_block = LeanCorrBlock(num_levels=levels, radius=radius)
        raft.corr_block = self._full_block

    @classmethod
    def from_file(cls, path: str | Path) -> "RaftFlow":
        raft = build_raft()
        state = torch.load(path, map_location="cpu", weights_only=True)
        raft.load_state_dict(state)
        return cls(raft.eval())

    def forward(self, current: torch.Tensor, previous: torch.Tensor, lean: bool = False) -> torch.Tensor:
        """Flow (N,2,H,W) in pixels that maps each pixel of ``current`` to its position in ``previous``."""
        self.raft.corr_block = self._lean_block if lean else self._full_block
        try:
            return self.raft(current, previous, num_flow_updates=self.num_flow_updates)[-1]
        finally:
            # torchvision keeps the pyramid alive until the next call: free it now, before denoising
            self._full_block.corr_pyramid = [torch.tensor(0)]
            self.raft.corr_block = self._full_block
            self._lean_block._fmap1, self._lean_block._pyramid = None, []

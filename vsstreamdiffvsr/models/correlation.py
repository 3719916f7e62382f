"""RAFT's correlation, three ways: torchvision's all-pairs float32 pyramid (the reference), that pyramid stored in
float16 (:class:`HalfCorrBlock`: half the memory) and no pyramid at all (:class:`LeanCorrBlock`: the same lookups
computed from the feature maps, far less memory, much more time)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CORR_MODES", "corr_pyramid_bytes", "full_corr_block", "HalfCorrBlock", "LeanCorrBlock"]

#: RAFT correlation implementations: torchvision's float32 pyramid, the float16-stored pyramid, no pyramid.
CORR_MODES = ("full", "half", "lean")


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


def full_corr_block(num_levels: int, radius: int) -> nn.Module:
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

        def release(self) -> None:
            self.corr_pyramid = [torch.tensor(0)]

    return DeviceCorrBlock(num_levels=num_levels, radius=radius)


def _check_fmaps(fmap1: torch.Tensor, fmap2: torch.Tensor, num_levels: int) -> None:
    if fmap1.shape != fmap2.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(fmap1.shape)} vs {tuple(fmap2.shape)}")
    min_size = 2 * 2 ** (num_levels - 1)
    if any(s < min_size for s in fmap1.shape[-2:]):
        raise ValueError(f"feature maps must be at least {min_size} px (inputs {8 * min_size} px)")


class HalfCorrBlock(nn.Module):
    """Drop-in for torchvision's ``CorrBlock`` that stores the correlation pyramid in float16 (half the memory).

    Level l of the reference's pyramid is the all-pairs volume average-pooled 2^l times over the second
    frame's pixels. Pooling is linear, so level l is also the product of the first frame's features with the
    second frame's pooled features: each level is one matmul written straight into its float16 store, with
    no float32 volume to pool, round and saturate (that came to ~25 GB of memory traffic per 1080p frame;
    the matmuls write 2.8 GB).

    On CUDA the matmuls take float16 inputs (the 11 significant bits TF32 keeps of the reference's float32
    inputs, at twice TF32's rate) and accumulate in float32, except where cuBLAS splits the 256-long sums into
    float16 partial sums (torch's default ``allow_fp16_reduced_precision_reduction``): each partial sum is held
    within float16's range by the same norm bound as the whole, so that costs rounding only. Elsewhere (CPU
    half-precision matmuls are ~30x slower than float32 ones) they run in float32, in row chunks of at most
    ``chunk_bytes``, and are rounded when stored. Either way the values differ from the reference's by rounding only.

    float16 tops out at 65504, and an inf in the pyramid would make the flow, and through the recurrence
    every later frame, NaN. A product is at most the product of its two feature vectors' norms, so each map is
    scaled by the power of two that keeps its largest norm within ``sqrt(65504)`` (with a margin for the
    rounding), and the lookup scales back: exact, and RAFT's features, whose norms are far smaller, are not
    scaled at all. The 9x9 bilinear lookup gathers each point's 10x10 integer neighbourhood (all 81 points
    share one fractional offset) and interpolates in float32 with zero padding: grid_sample's numbers up to
    rounding, without converting the volume back to float32.
    """

    def __init__(self, *, num_levels: int = 4, radius: int = 4, storage_dtype: torch.dtype = torch.float16,
                 chunk_bytes: int = 128 * 2**20, matmul_dtype: torch.dtype | None = None) -> None:
        """``matmul_dtype``: the matmuls' input precision; None = ``storage_dtype`` on CUDA, float32 elsewhere."""
        super().__init__()
        self.num_levels = num_levels
        self.radius = radius
        self.storage_dtype = storage_dtype
        self.chunk_bytes = chunk_bytes
        self.matmul_dtype = matmul_dtype
        self.out_channels = num_levels * (2 * radius + 1) ** 2
        self.corr_pyramid: list[torch.Tensor] = []
        self._sizes: list[tuple[int, int]] = []
        self._unscale: torch.Tensor | None = None  # 1 / the scales of build_pyramid, applied by the lookup

    def _range_scale(self, fmap: torch.Tensor) -> torch.Tensor:
        """The power of two <= 1 that brings ``fmap``'s largest feature-vector norm within sqrt(max / 1.002)
        of the storage type: products of two scaled maps then stay in range, with the matmul's float16 input
        rounding (2^-11 per value, 2^-10 per product) and its float32 sums inside the margin. A 0-dim tensor
        (no host sync: the build stays capturable in a CUDA graph)."""
        bound = math.sqrt(torch.finfo(self.storage_dtype).max / 1.002)
        norm = torch.linalg.vector_norm(fmap.float(), dim=1).amax()
        return torch.exp2(torch.floor(torch.log2(bound / norm))).clamp(max=1.0)  # norm 0: inf -> 1

    # Eager (compile_flow compiles RAFT's parts around it, RaftParts), and never compiled if a caller compiles
    # the whole flow: its work is a few matmuls written in place, nothing for a compiler to fuse, and inductor
    # would schedule the float32 route's chunks all at once (the whole float32 volume this block exists to
    # avoid; seen in its generated code on the CPU).
    @torch.compiler.disable(recursive=True)
    def build_pyramid(self, fmap1: torch.Tensor, fmap2: torch.Tensor) -> None:
        _check_fmaps(fmap1, fmap2, self.num_levels)
        b, c, h, w = fmap1.shape
        n = h * w
        # The reference divides every product by sqrt(tensor(C)); dividing f1 once gives the same numbers for
        # RAFT's 256 channels (a division by 16 commutes with every rounding)
        f1 = fmap1.float() / torch.sqrt(torch.tensor(c, dtype=torch.float32))
        pooled = [fmap2.float()]
        for _ in range(self.num_levels - 1):
            pooled.append(F.avg_pool2d(pooled[-1], kernel_size=2, stride=2))
        s1, s2 = self._range_scale(f1), self._range_scale(pooled[0])  # pooling never raises the largest norm
        mm_dtype = self.matmul_dtype or (self.storage_dtype if fmap1.device.type == "cuda" else torch.float32)
        direct = mm_dtype == self.storage_dtype  # the matmul writes the store itself, no float32 temporary
        a = (f1 * s1).to(mm_dtype).reshape(b, c, n).transpose(1, 2)  # (b, n, c)
        pyramid, sizes = [], []
        for f2 in pooled:
            hl, wl = f2.shape[-2:]
            m = hl * wl
            f2 = (f2 * s2).to(mm_dtype).reshape(b, c, m)
            dst = torch.empty(b * n, m, device=fmap1.device, dtype=self.storage_dtype)
            rows = n if direct else max(1, self.chunk_bytes // (4 * m))
            for bi in range(b):
                for r0 in range(0, n, rows):
                    r1 = min(n, r0 + rows)
                    out = dst[bi * n + r0: bi * n + r1]
                    if direct:
                        torch.matmul(a[bi, r0:r1], f2[bi], out=out)
                    else:
                        out.copy_(torch.matmul(a[bi, r0:r1], f2[bi]))
            pyramid.append(dst)
            sizes.append((hl, wl))
        self.corr_pyramid, self._sizes, self._unscale = pyramid, sizes, 1.0 / (s1 * s2)

    def index_pyramid(self, centroids_coords: torch.Tensor) -> torch.Tensor:
        # the sizes, not the tensor list: torch.compile cannot take the truth of a list of tensors, and broke
        # the whole flow into eager pieces here
        assert self._sizes, "build_pyramid first"
        b, _, h, w = centroids_coords.shape
        r, side = self.radius, 2 * self.radius + 1
        n = b * h * w
        xy = centroids_coords.permute(0, 2, 3, 1).reshape(n, 2).float()
        offs = torch.arange(-r, r + 2, device=xy.device)  # the 10 integer positions around the 9 points
        unscale = self._unscale  # a power of two, 1 for RAFT's features: folded into the row weights, exactly
        levels = []
        for vol, (hl, wl) in zip(self.corr_pyramid, self._sizes):
            x0, y0 = torch.floor(xy[:, 0]), torch.floor(xy[:, 1])
            fx, fy = (xy[:, 0] - x0)[:, None, None], (xy[:, 1] - y0)[:, None, None]
            ix, iy = x0.long()[:, None] + offs, y0.long()[:, None] + offs  # (n, 10)
            inside = ((iy >= 0) & (iy < hl))[:, :, None] & ((ix >= 0) & (ix < wl))[:, None, :]
            idx = iy.clamp(0, hl - 1)[:, :, None] * wl + ix.clamp(0, wl - 1)[:, None, :]  # (n, 10y, 10x)
            g = vol.gather(1, idx.view(n, -1)).view(n, side + 1, side + 1).float() * inside
            rows = g[:, :-1] * ((1 - fy) * unscale) + g[:, 1:] * (fy * unscale)  # (n, 9y, 10x)
            val = rows[:, :, :-1] * (1 - fx) + rows[:, :, 1:] * fx       # (n, 9y, 9x)
            levels.append(val.transpose(1, 2).reshape(b, h, w, side * side))  # x offset outer, as the reference
            xy = xy / 2
        return torch.cat(levels, dim=-1).permute(0, 3, 1, 2).contiguous()

    def release(self) -> None:
        self.corr_pyramid, self._sizes, self._unscale = [], [], None


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
        _check_fmaps(fmap1, fmap2, self.num_levels)
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

    def release(self) -> None:
        self._fmap1, self._pyramid = None, []

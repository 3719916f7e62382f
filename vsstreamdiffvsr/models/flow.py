"""Optical flow for Stream-DiffVSR: bicubic x4 of the LR frames, torchvision RAFT-large, and the warp.

The reference computes the flow *from the current frame to the previous one* at HR, on PyTorch's
bicubic x4 (a = -0.75, ``align_corners=False``, no antialias, no clamp) of the [-1, 1] LR frames,
and warps the previous raw HQ output with a grid normalised by ``(W-1, H-1)`` but sampled with
``align_corners=False`` (so zero flow is *not* the identity: a slight shift and blur toward the
borders, zeros outside). Both quirks are reproduced exactly; the model was trained with them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RAFT_FILENAME", "RAFT_URL", "MIN_FLOW_SIDE", "bicubic_x4", "warp", "build_raft", "RaftFlow",
           "RaftParts", "HalfCorrBlock", "LeanCorrBlock", "corr_pyramid_bytes", "CORR_MODES"]

#: RAFT correlation implementations: torchvision's float32 pyramid, the float16-stored pyramid, no pyramid.
CORR_MODES = ("full", "half", "lean")

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
    # sampled in float32 whatever x is: float16 positions have a step of 1 px between 1024 and 2048
    vgrid = _base_grid(h, w, x.device, torch.float32) + flow.permute(0, 2, 3, 1).float()
    vx = 2.0 * vgrid[..., 0] / max(w - 1, 1) - 1.0
    vy = 2.0 * vgrid[..., 1] / max(h - 1, 1) - 1.0
    return F.grid_sample(x.float(), torch.stack((vx, vy), dim=3), mode="bilinear", padding_mode="zeros",
                         align_corners=False).to(x.dtype)


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


class RaftParts(NamedTuple):
    """The pieces of one RAFT flow that ``compile_flow`` compiles, each on its own (:meth:`RaftFlow.parts`).

    The 12 updates run the one compiled ``update`` 12 times, rather than one graph with the updates unrolled:
    the same kernels, and the update compiles once instead of 12 times. The pyramid build and the loop
    between the parts run eagerly.
    """

    #: image -> RAFT's feature map
    encode: Callable[[torch.Tensor], torch.Tensor]
    #: image -> (hidden state, context): the context encoder's output split, tanh and relu
    context: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    #: (correlation block, hidden, context, coords0, coords1) -> (hidden, coords1): one refinement update
    update: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    #: (hidden, coords0, coords1) -> the flow at full size (mask head and convex x8 upsampling)
    upsample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RaftFlow(nn.Module):
    """RAFT-large flow ``current -> previous`` on [-1, 1] frames, 12 refinement updates.

    ``corr="full"`` uses torchvision's all-pairs float32 correlation pyramid (the reference), ``"half"``
    the :class:`HalfCorrBlock` (the pyramid stored in float16: half the memory) and ``"lean"`` the
    :class:`LeanCorrBlock` (no pyramid: the same flow up to float rounding, far less memory, much more time).
    """

    def __init__(self, raft: nn.Module, num_flow_updates: int = 12) -> None:
        super().__init__()
        self.raft = raft
        #: the precision of RAFT's networks (its weights'); see :meth:`with_dtype`
        self.compute_dtype = next(raft.parameters()).dtype
        self.num_flow_updates = num_flow_updates
        levels, radius = raft.corr_block.num_levels, raft.corr_block.radius
        self._full_block = _full_corr_block(levels, radius)
        self._blocks: dict[str, nn.Module] = {
            "full": self._full_block, "half": HalfCorrBlock(num_levels=levels, radius=radius),
            "lean": LeanCorrBlock(num_levels=levels, radius=radius)}
        raft.corr_block = self._full_block  # for torchvision's own forward; ours passes the block it uses

    def with_dtype(self, dtype: torch.dtype) -> "RaftFlow":
        """This RAFT with its networks (encoders, update block, mask head) in ``dtype``: ``self`` if they
        already are, else a copy.

        RAFT's own mixed-precision recipe (princeton-vl/RAFT, ``--mixed_precision``): the networks in half
        precision, while the correlation pyramid, its lookups, the flow coordinates and the convex x8
        upsampling stay in float32.
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"RAFT runs in float32, float16 or bfloat16, not {dtype}")
        if dtype == self.compute_dtype:
            return self
        return RaftFlow(copy.deepcopy(self.raft).to(dtype), self.num_flow_updates)

    @property
    def parts(self) -> RaftParts:
        """The eager parts of :meth:`flow_and_features`, for a compiler to wrap one by one."""
        return RaftParts(self.encode, self._context, self._update, self._upsample)

    def _context(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context_out = self.raft.context_encoder(image.to(self.compute_dtype))
        hidden_size = self.raft.update_block.hidden_state_size
        hidden, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size], dim=1)
        return torch.tanh(hidden), F.relu(context)

    def _update(self, block: nn.Module, hidden: torch.Tensor, context: torch.Tensor, coords0: torch.Tensor,
                coords1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the lookups and the coordinates in float32, the update block in RAFT's precision (no-ops in float32)
        corr_features = block.index_pyramid(centroids_coords=coords1).to(self.compute_dtype)
        hidden, delta_flow = self.raft.update_block(hidden, context, corr_features,
                                                    (coords1 - coords0).to(self.compute_dtype))
        return hidden, coords1 + delta_flow.float()

    def _upsample(self, hidden: torch.Tensor, coords0: torch.Tensor, coords1: torch.Tensor) -> torch.Tensor:
        from torchvision.models.optical_flow._utils import upsample_flow

        up_mask = None if self.raft.mask_predictor is None else self.raft.mask_predictor(hidden).float()
        return upsample_flow(flow=coords1 - coords0, up_mask=up_mask)

    def _final_flow(self, image1: torch.Tensor, image2: torch.Tensor | None, block: nn.Module,
                    fmap2: torch.Tensor | None = None, parts: RaftParts | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's ``RAFT.forward(...)[-1]``, with its own modules, in its order of operations; returns
        the flow and image1's feature map.

        Differences: only the final estimate is upsampled (torchvision runs the mask head and the convex x8
        upsampling after each of the 12 updates and we keep the last), and the coordinate grid is made on
        the device (torchvision builds it on the CPU and copies it, a host stall that would hold up a flow
        queued on a side stream); both leave the result bit for bit the same. And each image is encoded on
        its own, where torchvision encodes the pair as one batch of two: the encoder works per image
        (instance norm, convolutions), so this is the same function (bit for bit on the CPU; on a GPU the
        kernels for a batch of one may round differently). Encoding per image makes a kept feature map
        exactly what encoding the image again would give.

        ``fmap2``: image2's feature map from the previous pair (where it was image1): only image1 is encoded,
        and image2 may be None.
        ``parts``: the pieces to run (compiled ones, :class:`RaftParts`); None = :attr:`parts`, eager.
        """
        encode, context_of, update, upsample = parts or self.parts
        b, _, h, w = image1.shape
        if (image2 is not None and image2.shape != image1.shape) or h % 8 or w % 8:
            raise ValueError(f"RAFT needs two frames of one size with sides divisible by 8, got "
                             f"{tuple(image1.shape)} and {None if image2 is None else tuple(image2.shape)}")
        fmap1 = encode(image1)
        if fmap2 is None:
            if image2 is None:
                raise ValueError("RAFT needs the previous frame or its feature map (previous_features)")
            fmap2 = encode(image2)
        elif fmap2.shape != fmap1.shape:
            raise ValueError(f"previous features {tuple(fmap2.shape)} do not fit image1's {tuple(fmap1.shape)}")
        if isinstance(block, HalfCorrBlock):
            block.build_pyramid(fmap1, fmap2)  # it rounds the maps itself
        else:  # torchvision's pyramid and the lean one compute in the maps' precision: float32, as the recipe
            block.build_pyramid(fmap1.float(), fmap2.float())
        hidden, context = context_of(image1)
        gy, gx = torch.meshgrid(torch.arange(h // 8, device=image1.device), torch.arange(w // 8, device=image1.device),
                                indexing="ij")
        coords0 = torch.stack((gx, gy), dim=0).float()[None].repeat(b, 1, 1, 1)
        coords1 = coords0.clone()
        for _ in range(self.num_flow_updates):
            hidden, coords1 = update(block, hidden, context, coords0, coords1)
        return upsample(hidden, coords0, coords1), fmap1

    @classmethod
    def from_file(cls, path: str | Path) -> "RaftFlow":
        raft = build_raft()
        state = torch.load(path, map_location="cpu", weights_only=True)
        raft.load_state_dict(state)
        return cls(raft.eval())

    def forward(self, current: torch.Tensor, previous: torch.Tensor, corr: str = "full") -> torch.Tensor:
        """Flow (N,2,H,W) in pixels that maps each pixel of ``current`` to its position in ``previous``."""
        return self.flow_and_features(current, previous, corr)[0]

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """RAFT's feature map of one image (in :attr:`compute_dtype`), as :meth:`flow_and_features` makes
        and takes it."""
        return self.raft.feature_encoder(image.to(self.compute_dtype))

    def flow_and_features(self, current: torch.Tensor, previous: torch.Tensor | None, corr: str = "full",
                          previous_features: torch.Tensor | None = None, parts: RaftParts | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s flow and ``current``'s feature map, which the next pair can take as
        ``previous_features`` when its ``previous`` is this ``current`` (one encoder pass saved per frame;
        ``previous`` is then not needed and may be None). ``parts``: compiled versions of :attr:`parts` to run
        instead of the eager ones."""
        if corr not in self._blocks:
            raise ValueError(f"corr must be one of {CORR_MODES}, got {corr!r}")
        block = self._blocks[corr]
        try:
            return self._final_flow(current, previous, block, previous_features, parts)
        finally:
            block.release()  # the blocks keep their pyramid until told: free it now, before denoising

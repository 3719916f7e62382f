"""Optical flow for Stream-DiffVSR: bicubic x4 of the LR frames, torchvision RAFT-large, and the warp.

The reference computes the flow *from the current frame to the previous one* at HR, on PyTorch's
bicubic x4 (a = -0.75, ``align_corners=False``, no antialias, no clamp) of the [-1, 1] LR frames,
and warps the previous raw HQ output with a grid normalised by ``(W-1, H-1)`` but sampled with
``align_corners=False`` (so zero flow is *not* the identity: a slight shift and blur toward the
borders, zeros outside). Both quirks are reproduced exactly; the model was trained with them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .correlation import CORR_MODES, HalfCorrBlock, LeanCorrBlock, full_corr_block

__all__ = ["RAFT_FILENAME", "RAFT_URL", "MIN_FLOW_SIDE", "bicubic_x4", "warp", "build_raft", "RaftFlow",
           "RaftParts"]

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
        self._full_block = full_corr_block(levels, radius)
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

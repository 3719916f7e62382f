"""Tiles for frames too large to run at once: cropped margins for the HR stages, feathering for the U-Net.

Tiles are laid out on the LR grid (the latent lives at LR resolution); the HR output of a tile is the
same region times 4. Every tile has the same size (the last row/column is aligned to the frame edge),
so a compiled model sees one static shape.

* :func:`crop_layout`: the stages at HR size (ARTG's condition embedding, the TPM encoder, the decoder)
  are stacks of convolutions, so a tile computed with a margin of context and cropped to its core gives
  the untiled values. Cores partition the frame and lie at least ``margin`` inside their tile. One
  exception: TPM runs a 1-D convolution over the rows of its pooled grid joined end to end, so near the
  frame's left and right edges a pixel sees the other end of the neighbouring row, which a tile that
  does not span the frame's width replaces by its own (measured: within ~30 LR px of those edges).
* :func:`tile_layout` + :func:`feather_weight`: the denoising itself, tiled only when it does not fit
  whole. GroupNorm statistics and attention then see a tile rather than the frame, so tiles differ from
  the whole frame everywhere, not only at their edges; weights ramp linearly across each overlap and
  stay 1 at frame borders, so the blend is a partition of unity with no visible seam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tile", "crop_layout", "tile_layout", "feather_weight", "within", "halve"]


@dataclass(frozen=True)
class Tile:
    """An LR region [y0, y0+h) x [x0, x0+w)."""

    y0: int
    x0: int
    h: int
    w: int

    def lr(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)

    def hr(self, scale: int = 4) -> tuple[slice, slice]:
        return slice(scale * self.y0, scale * (self.y0 + self.h)), slice(scale * self.x0, scale * (self.x0 + self.w))


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if tile >= size:
        return [0]
    step = max(tile - overlap, 1)
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return sorted(set(starts))


def tile_layout(h: int, w: int, tile: tuple[int, int], overlap: int) -> list[Tile]:
    """Tiles covering an h x w LR frame; tiles never exceed the frame (a smaller frame is one tile). The
    overlap is capped at half a tile side (a multiple of 4), so tiles advance by at least half a tile and
    their origins stay on multiples of 4, whatever tile the out-of-memory fallback shrinks to."""
    th, tw = min(tile[0], h), min(tile[1], w)
    oy, ox = (min(overlap, t // 2 // 4 * 4) for t in (th, tw))
    return [Tile(y, x, th, tw) for y in _starts(h, th, oy) for x in _starts(w, tw, ox)]


def _cores(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) of each tile's core: cut in the middle of each overlap, so cores partition [0, size)."""
    cuts = [0] + [(nxt + prev + tile) // 2 for prev, nxt in zip(starts, starts[1:])] + [size]
    return list(zip(cuts, cuts[1:]))


def crop_layout(h: int, w: int, tile: tuple[int, int], margin: int) -> list[tuple[Tile, Tile]]:
    """(tile, core) pairs covering an h x w LR frame: equal tiles overlapping by at least ``2 * margin``
    (less where a tile side leaves no room: at most half of it, so tiles keep advancing), whose cores
    partition the frame, each at least that margin from its tile's edges inside the frame. A frame that
    fits one tile is one pair. Tile origins stay on multiples of 4 (TPM pools 4x4 LR pixels)."""
    th, tw = min(tile[0], h), min(tile[1], w)
    my, mx = (min(margin, t // 4 // 4 * 4) for t in (th, tw))
    ys, xs = _starts(h, th, 2 * my), _starts(w, tw, 2 * mx)
    return [(Tile(y, x, th, tw), Tile(cy0, cx0, cy1 - cy0, cx1 - cx0))
            for y, (cy0, cy1) in zip(ys, _cores(ys, th, h)) for x, (cx0, cx1) in zip(xs, _cores(xs, tw, w))]


def _ramp(n: int, lo_overlap: int, hi_overlap: int, device: torch.device) -> torch.Tensor:
    r = torch.ones(n, device=device, dtype=torch.float32)
    if lo_overlap > 0:
        r[:lo_overlap] = (torch.arange(lo_overlap, device=device, dtype=torch.float32) + 0.5) / lo_overlap
    if hi_overlap > 0:
        r[n - hi_overlap:] = torch.minimum(
            r[n - hi_overlap:],
            (torch.arange(hi_overlap, 0, -1, device=device, dtype=torch.float32) - 0.5) / hi_overlap)
    return r


def feather_weight(t: Tile, tiles: list[Tile], frame_h: int, frame_w: int, scale: int,
                   device: torch.device) -> torch.Tensor:
    """(1,1,scale*h,scale*w) blending weight of ``t``: ramps over overlaps with neighbours, 1 elsewhere."""
    top = max((o.y0 + o.h - t.y0 for o in tiles if o.y0 < t.y0 and o.y0 + o.h > t.y0 and o.x0 == t.x0), default=0)
    bottom = max((t.y0 + t.h - o.y0 for o in tiles if o.y0 > t.y0 and o.y0 < t.y0 + t.h and o.x0 == t.x0), default=0)
    left = max((o.x0 + o.w - t.x0 for o in tiles if o.x0 < t.x0 and o.x0 + o.w > t.x0 and o.y0 == t.y0), default=0)
    right = max((t.x0 + t.w - o.x0 for o in tiles if o.x0 > t.x0 and o.x0 < t.x0 + t.w and o.y0 == t.y0), default=0)
    wy = _ramp(scale * t.h, scale * top, scale * bottom, device)
    wx = _ramp(scale * t.w, scale * left, scale * right, device)
    return (wy[:, None] * wx[None, :])[None, None]


def within(core: Tile, tile: Tile, scale: int) -> tuple[slice, slice]:
    """``core``'s place inside ``tile``'s output, at ``scale`` times the LR grid."""
    return (slice(scale * (core.y0 - tile.y0), scale * (core.y0 - tile.y0 + core.h)),
            slice(scale * (core.x0 - tile.x0), scale * (core.x0 - tile.x0 + core.w)))


def halve(tile: tuple[int, int]) -> tuple[int, int]:
    """The next smaller tile the out-of-memory fallback tries: each side halved to a multiple of 8, at least 32."""
    return max(32, tile[0] // 2 // 8 * 8), max(32, tile[1] // 2 // 8 * 8)

"""Stage 3 in tiles: a :class:`TilePlan` says how a frame size runs (whole; HR stages in cropped tiles around the
whole-latent denoising; or everything in feathered tiles); the out-of-memory ladder replaces the plan, never a
setting, and the plan that fitted is kept for that frame size."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TilingFallbackWarning
from ..options import Options
from .denoise import Denoiser
from .model import Model
from .tiles import Tile, crop_layout, feather_weight, halve, tile_layout, within

__all__ = ["TilePlan", "TiledRunner", "AUTO_TILE", "TILE_MARGIN"]

#: LR tile used when a frame does not fit and no tile size was given (720p output per tile)
AUTO_TILE = (192, 320)
#: LR pixels of context around each tile of the HR stages, computed and cropped away (at most a quarter of the
#: tile side): an impulse reaches about 40 LR px through the decoder and its TPM features (docs/design.md)
TILE_MARGIN = 32
#: bytes per HR output pixel and decoder channel that a whole frame holds at its peak (activations of the HR
#: stages, float32), for planning tiles before a frame runs out of memory
_HR_BYTES_PER_CHANNEL = 4 * 4


@dataclass(frozen=True)
class TilePlan:
    """How one frame size runs: ``tile`` None = whole frames; else LR tiles for the HR stages, and with
    ``denoise`` for the denoising too."""

    tile: tuple[int, int] | None = None
    denoise: bool = False

    def describe(self) -> str:
        if self.tile is None:
            return "whole frames"
        what = "denoising and decoding" if self.denoise else "decoding (the denoising whole)"
        return f"{what} in {self.tile[0]}x{self.tile[1]} LR tiles"


class _DenoiseOutOfMemory(torch.OutOfMemoryError):
    """The whole-latent denoising of a frame with tiled HR stages ran out of memory (not a tile)."""


class TiledRunner:
    """Runs the :class:`Denoiser` by a plan; on out-of-memory climbs the ladder (HR stages in tiles, then the
    denoising too, then halved tiles) and keeps the plan that fitted in the model, under a key that names the
    frame size and the tiling options."""

    def __init__(self, model: Model, options: Options, stats: dict[str, int]) -> None:
        self.model, self.options, self.stats = model, options, stats
        self._layouts: dict[tuple[Any, ...], list[tuple[Tile, Any]]] = {}

    def plan_for(self, h: int, w: int) -> TilePlan:
        """The plan for LR frames of h x w: the kept one, else the options', else (CUDA) tiles from the start when
        the whole frame's HR stages would not fit in the free memory."""
        o = self.options
        kept = self.model.tile_plans.get(self._key(h, w))
        if kept is not None:
            return kept
        if o.tile is not None or not o.oom_fallback or self.model.device.type != "cuda":
            return TilePlan(o.tile, o.tile_denoise)  # type: ignore[arg-type]
        free, _ = torch.cuda.mem_get_info(self.model.device)
        width = max(self.model.components.vae.decoder.layers[0].out_channels, 64)
        need = 16 * h * w * width * _HR_BYTES_PER_CHANNEL
        return TilePlan(AUTO_TILE) if need > free and len(self.layout(h, w, TilePlan(AUTO_TILE))) > 1 else TilePlan()

    def _key(self, h: int, w: int) -> tuple[Any, ...]:
        o = self.options
        return (h, w), o.tile, o.tile_denoise, o.tile_overlap

    def layout(self, h: int, w: int, plan: TilePlan) -> list[tuple[Tile, Any]]:
        """Denoising tiles with their feathered weights, or HR-stage (tile, core) pairs; made once per size."""
        assert plan.tile is not None
        key = (h, w, plan.tile, self.options.tile_overlap, plan.denoise)
        cached = self._layouts.get(key)
        if cached is None:
            if plan.denoise:
                tiles = tile_layout(h, w, plan.tile, self.options.tile_overlap)
                cached = [(t, feather_weight(t, tiles, h, w, 4, self.model.device)) for t in tiles]
            else:
                cached = crop_layout(h, w, plan.tile, TILE_MARGIN)
            self._layouts = {key: cached}  # one layout at a time
        return cached

    def run(self, den: Denoiser, plan: TilePlan, z: torch.Tensor, x: torch.Tensor,
            warped: torch.Tensor | None) -> torch.Tensor:
        """Denoise and decode by ``plan``: raw y (B,3,4h,4w)."""
        h, w = x.shape[-2:]
        tiles = self.layout(h, w, plan) if plan.tile is not None else []
        if len(tiles) <= 1:
            return den(z, x, warped)
        if not plan.denoise:
            y = self._hr_tiles(den, z, x, warped, tiles)
        else:
            b = x.shape[0]
            acc = torch.zeros(b, 3, 4 * h, 4 * w, device=x.device, dtype=torch.float32)
            wsum = torch.zeros(1, 1, 4 * h, 4 * w, device=x.device, dtype=torch.float32)
            for t, wt in tiles:
                (ly, lx), (hy, hx) = t.lr(), t.hr()
                w_t = warped[..., hy, hx] if warped is not None else None
                acc[..., hy, hx] += den(z[..., ly, lx], x[..., ly, lx], w_t) * wt
                wsum[..., hy, hx] += wt
            y = acc / wsum
        self.stats["tiled_frames"] += 1
        return y

    def _hr_tiles(self, den: Denoiser, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None,
                  tiles: list[tuple[Tile, Tile]]) -> torch.Tensor:
        """The 4 steps on the whole LR latent; ARTG's embedding, TPM encoder and decoder per tile, each computed
        with its margin of context and cropped to its core (the cores partition the frame)."""
        b, (h, w) = x.shape[0], x.shape[-2:]
        # a ControlNet that keeps its embedding (BGR-order models) embeds the whole warped frame itself
        cond = None if warped is None or den.c.cond_embedding is None else self._embed_tiled(den, warped, tiles)
        try:
            latent = den.denoise(z, x, warped, cond=cond)
        except torch.OutOfMemoryError as exc:
            message: str | None = f"out of memory in the whole-latent denoising: {exc}"
        else:
            message = None
        del cond
        if message is not None:  # raised outside the handler: the failed attempt's tensors go first
            raise _DenoiseOutOfMemory(message)
        y = torch.empty(b, 3, 4 * h, 4 * w, device=x.device, dtype=torch.float32)
        for t, core in tiles:
            feats = None if warped is None else den.tpm_features(warped[(..., *t.hr())])
            out = den.decode(latent[(..., *t.lr())], feats)
            y[(..., *core.hr())] = out[(..., *within(core, t, 4))].float()
            del feats, out  # before the next tile's are made: one tile's features at a time
        return y

    def _embed_tiled(self, den: Denoiser, warped: torch.Tensor, tiles: list[tuple[Tile, Tile]]) -> torch.Tensor:
        """ARTG's conditioning embedding of the HR ``warped`` frame, made per tile and cropped: (B,C,h,w)."""
        out: torch.Tensor | None = None
        for t, core in tiles:
            e = den.embedding(warped[(..., *t.hr())])
            if out is None:
                h, w = warped.shape[-2] // 4, warped.shape[-1] // 4
                out = torch.empty(e.shape[0], e.shape[1], h, w, device=e.device, dtype=e.dtype).contiguous(
                    memory_format=den.fmt)
            out[(..., *core.lr())] = e[(..., *within(core, t, 1))]
            del e
        assert out is not None
        return out

    def run_planned(self, den: Denoiser, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None
                    ) -> torch.Tensor:
        """:meth:`run` by this size's plan; on out-of-memory, down the ladder until the frame fits."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        plan = self.plan_for(h, w)
        try:
            return self.run(den, plan, z, x, warped)
        except torch.OutOfMemoryError as exc:
            if not self.options.oom_fallback:
                raise
            in_denoise, error = isinstance(exc, _DenoiseOutOfMemory), str(exc).splitlines()[0][:300]
        # retried outside the except block: its traceback would keep the failed attempt's tensors alive
        self.stats["oom_fallbacks"] += 1
        while True:
            self.model.empty_cache()
            nxt = self._next(h, w, plan, in_denoise)
            if nxt is None:
                raise torch.OutOfMemoryError(f"vsstreamdiffvsr: out of GPU memory for a {w}x{h} LR frame even in "
                                             f"the smallest tiles; free GPU memory or use another GPU ({error})")
            plan = nxt
            warnings.warn(f"vsstreamdiffvsr: out of GPU memory; {plan.describe()} from now on (pass tile= / "
                          "tile_denoise= to choose)", TilingFallbackWarning, stacklevel=6)
            try:
                y = self.run(den, plan, z, x, warped)
            except torch.OutOfMemoryError as exc:
                in_denoise, error = isinstance(exc, _DenoiseOutOfMemory), str(exc).splitlines()[0][:300]
                continue  # the loop's next empty_cache runs outside this handler
            self.model.tile_plans[self._key(h, w)] = plan
            return y

    def _next(self, h: int, w: int, plan: TilePlan, in_denoise: bool) -> TilePlan | None:
        """The plan after ``plan`` failed, skipping those that would run the frame as a single tile again; None
        when none is left."""
        tile, denoise = plan.tile, plan.denoise
        while True:
            if tile is None:
                tile = AUTO_TILE
            elif in_denoise and not denoise:
                denoise = True
            elif halve(tile) == tile:
                return None
            else:
                tile = halve(tile)
            candidate = TilePlan(tile, denoise)
            if len(self.layout(h, w, candidate)) > 1:
                return candidate

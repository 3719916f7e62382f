"""Tiling (vsstreamdiffvsr.tiling and the pipeline's tiled runs): layouts, feathered blending, cropped HR
stages equal to the whole frame, tiled denoising close to it.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from vsstreamdiffvsr import Options, StreamDiffVSR
from vsstreamdiffvsr.pipeline.tiled import TilePlan
from vsstreamdiffvsr.pipeline.tiles import crop_layout, feather_weight, tile_layout

from ..streams import frames_and_noise, psnr, run


def test_feathered_tiles_are_a_partition_of_unity() -> None:
    for h, w, tile, ov in ((64, 80, (32, 32), 16), (100, 52, (48, 40), 8), (36, 36, (64, 64), 16)):
        tiles = tile_layout(h, w, tile, ov)
        total = torch.zeros(1, 1, 4 * h, 4 * w)
        for t in tiles:
            assert t.y0 + t.h <= h and t.x0 + t.w <= w and t.h == min(tile[0], h) and t.w == min(tile[1], w)
            hy, hx = t.hr()
            total[..., hy, hx] += feather_weight(t, tiles, h, w, 4, torch.device("cpu"))
        assert float((total - 1).abs().max()) <= 1e-5
    with pytest.raises(ValueError):
        Options(tile=30)
    with pytest.raises(ValueError):
        Options(tile=(64, 20))


def test_tile_layout_caps_the_overlap_at_half_a_tile() -> None:
    """An overlap as large as the tile (the fallback shrinks tiles under a fixed tile_overlap) would step one
    pixel at a time: millions of tiles at 1080p, off the multiple-of-4 grid."""
    tiles = tile_layout(1080, 1920, (32, 32), 32)
    assert len(tiles) == len({(t.y0, t.x0) for t in tiles}) <= (1080 // 16 + 1) * (1920 // 16 + 1)
    assert all(t.y0 % 4 == 0 and t.x0 % 4 == 0 for t in tiles)
    assert tile_layout(64, 64, (64, 64), 32) == [tile_layout(64, 64, (64, 64), 0)[0]]


def test_tiling_options_are_checked_together(pipe: StreamDiffVSR) -> None:
    with pytest.raises(ValueError, match="tile_overlap .* at most half"):
        pipe.with_options(tile=64, tile_overlap=40)
    with pytest.raises(ValueError, match=r"tile_denoise=True needs a tile size"):
        pipe.with_options(tile=None, tile_denoise=True)
    with pytest.raises(ValueError, match="tile_denoise must be True or False"):
        pipe.with_options(tile=64, tile_denoise="no")
    view = pipe.with_options(tile=64, tile_overlap=32, tile_denoise=True)
    assert view.tiler.plan_for(64, 64) == TilePlan((64, 64), True)


def _local_stand_ins(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Local stand-ins for the model's stages: the decoder sees k x k pixels around a pixel (a margin
    of context is what makes a cropped tile exact; blended tiles are exact only for pointwise stages)."""
    den = pipe.denoiser

    def denoise(z, x, warped, cond=None):
        if cond is None and warped is not None:
            cond = den.embed(warped)
        return z * 0.5 + x[:, :1] + (0 if cond is None else cond[:, :1])

    def decode(z, feats):
        up = F.interpolate(F.avg_pool2d(z[:, :3], k, 1, k // 2), scale_factor=4, mode="nearest")
        return up if feats is None else up + F.avg_pool2d(feats[0], k, 1, k // 2)

    monkeypatch.setattr(den, "denoise", denoise)
    monkeypatch.setattr(den, "embed", lambda w: F.avg_pool2d(w, 4))
    monkeypatch.setattr(den, "features", lambda w: [w * 0.25])
    monkeypatch.setattr(den, "decode_warm", decode)
    monkeypatch.setattr(pipe.components.vae, "decode", decode)


@pytest.mark.parametrize("tile_denoise", [False, True])
def test_tiling_places_and_blends_tiles_exactly(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch,
                                                tile_denoise: bool) -> None:
    """With purely local stand-ins for the model, the tiled frame equals the untiled one exactly: cropped
    tiles around the whole-latent denoising, and feathered tiles of the denoising too."""
    tiled = pipe.with_options(tile=32, tile_overlap=8, tile_denoise=tile_denoise)
    _local_stand_ins(tiled, monkeypatch, k=1 if tile_denoise else 5)
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(1, 4, 56, 72, generator=g), torch.rand(1, 3, 56, 72, generator=g)
    warped = torch.rand(1, 3, 4 * 56, 4 * 72, generator=g)  # a warm frame: the path with the decoder seam
    for w in (warped, None):
        whole = tiled.tiler.run(tiled.denoiser, TilePlan(), z, x, w)
        parts = tiled.tiler.run(tiled.denoiser, TilePlan((32, 32), tile_denoise), z, x, w)
        assert float((whole - parts).abs().max()) <= 1e-5
    assert tiled.stats["tiled_frames"] == 2


def test_crop_layout_cores_partition_the_frame_inside_their_margins() -> None:
    for h, w, tile, margin in ((64, 80, (32, 32), 32), (540, 960, (192, 320), 32), (100, 52, (48, 40), 12),
                               (36, 36, (64, 64), 32)):
        pairs = crop_layout(h, w, tile, margin)
        count = torch.zeros(h, w, dtype=torch.int32)
        for t, core in pairs:
            assert (t.h, t.w) == (min(tile[0], h), min(tile[1], w)) and t.y0 % 4 == 0 and t.x0 % 4 == 0
            assert t.y0 <= core.y0 and core.y0 + core.h <= t.y0 + t.h
            assert t.x0 <= core.x0 and core.x0 + core.w <= t.x0 + t.w
            m = (min(margin, t.h // 4 // 4 * 4), min(margin, t.w // 4 // 4 * 4))
            # inside the frame, a core keeps its tile's margin of context on every side
            assert core.y0 == 0 or core.y0 - t.y0 >= m[0]
            assert core.y0 + core.h == h or t.y0 + t.h - (core.y0 + core.h) >= m[0]
            assert core.x0 == 0 or core.x0 - t.x0 >= m[1]
            assert core.x0 + core.w == w or t.x0 + t.w - (core.x0 + core.w) >= m[1]
            count[core.y0:core.y0 + core.h, core.x0:core.x0 + core.w] += 1
        assert bool((count == 1).all())


@pytest.mark.parametrize(("h", "w"), [(68, 164)])  # multiples of 4, not of 8: the harder layout
def test_tiled_close_to_untiled(pipe: StreamDiffVSR, h: int, w: int) -> None:
    frames, noises = frames_and_noise(2, h, w)
    ref = run(pipe, frames, noises)
    # two 128-px tiles side by side: the HR stages cropped with a 32 px margin, the denoising whole
    tiled = pipe.with_options(tile=128)
    out = run(tiled, frames, noises)
    assert tiled.stats["tiled_frames"] == 2
    for i, (a, b) in enumerate(zip(out, ref)):
        # exact but where TPM's 1-D convolution joins each row's end to the next row's start: within about
        # 30 LR px of the frame's left and right edges a tile's rows end at the tile, the frame's elsewhere
        # (warm frames only; the tile seam at 80 LR px is inside the checked band)
        assert float((a - b)[..., 40 * 4:-40 * 4].abs().max()) <= 1e-5
        assert float((a - b).abs().max()) <= (0.0 if i == 0 else 1e-2) and psnr(a, b) >= 60.0
    both = pipe.with_options(tile=128, tile_overlap=16, tile_denoise=True)
    out = run(both, frames, noises)
    assert both.stats["tiled_frames"] == 2
    for a, b in zip(out, ref):
        # GroupNorm statistics and attention see a tile, not the frame: close, not equal (tiny random model)
        assert 30.0 <= psnr(a, b) < 200.0
    single = pipe.with_options(tile=(h // 8 * 8 + 8, w // 8 * 8 + 8))  # one tile covering the frame = untiled
    for a, b in zip(run(single, frames, noises), ref):
        assert float((a - b).abs().max()) == 0.0


def test_cropped_tiles_with_the_embedding_kept_in_the_controlnet(pipe: StreamDiffVSR) -> None:
    """A model whose ControlNet keeps its conditioning embedding (BGR order) tiles as one that does not."""
    frames, noises = frames_and_noise(2, 64, 160)
    split = run(pipe.with_options(tile=128), frames, noises)
    import dataclasses

    from vsstreamdiffvsr.pipeline.model import Model

    inside = StreamDiffVSR(Model(dataclasses.replace(pipe.components, cond_embedding=None)), pipe.options)
    inside = inside.with_options(tile=128)
    controlnet = pipe.components.controlnet  # shared; pytest's monkeypatch would delete a submodule on undo
    identity = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = pipe.components.cond_embedding
    try:
        out = run(inside, frames, noises)
    finally:
        controlnet.controlnet_cond_embedding = identity
    assert inside.stats["tiled_frames"] == 2
    for a, b in zip(out, split):
        assert float((a - b).abs().max()) <= 1e-5


def test_hr_tiles_hold_one_tiles_features_at_a_time(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous tile's TPM features and decoder output are freed before the next tile's are made."""
    import weakref

    frames, noises = frames_and_noise(2, 64, 64)
    tiled = pipe.with_options(tile=32)
    real = tiled.denoiser.features
    made, alive_at_call = [], []

    def features(w):
        alive_at_call.append(sum(r() is not None for r in made))
        out = real(w)
        made.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(tiled.denoiser, "features", features)
    run(tiled, frames, noises)
    assert len(alive_at_call) > 1 and not any(alive_at_call)


def test_sizes_that_would_not_fit_start_tiled_on_cuda(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planned, not discovered: on CUDA a frame size whose HR stages would not fit the free memory starts in
    AUTO_TILE tiles; one that fits, or any with a tile given, a kept plan or the ladder turned off, as asked."""
    from types import SimpleNamespace

    from vsstreamdiffvsr.pipeline.tiled import AUTO_TILE, TiledRunner

    model = SimpleNamespace(device=torch.device("cuda"), tile_plans={}, components=pipe.components)
    free = {"bytes": 2 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    runner = TiledRunner(model, Options(device="cuda"), {})  # type: ignore[arg-type]
    assert runner.plan_for(540, 960) == TilePlan(AUTO_TILE)   # 4K out: ~8 GiB of HR activations
    assert runner.plan_for(180, 320) == TilePlan()            # 720p out: fits
    free["bytes"] = 64 * 2**30
    assert runner.plan_for(540, 960) == TilePlan()            # a large GPU runs 4K whole
    free["bytes"] = 2**20
    assert TiledRunner(model, Options(device="cuda", tile=64), {}).plan_for(540, 960) == TilePlan((64, 64))
    assert TiledRunner(model, Options(device="cuda", oom_fallback=False), {}).plan_for(540, 960) == TilePlan()
    model.tile_plans[((540, 960), None, False, 16)] = TilePlan((96, 160), True)
    assert runner.plan_for(540, 960) == TilePlan((96, 160), True)  # what the ladder settled on wins

"""The safety nets: a NaN/Inf half-precision frame (or flow) recomputed in float32, out-of-memory frames
retried in tiles, RAFT out of memory retried with the lean correlation then at LR, and the clear errors
when nothing fits or the weights are broken. Out-of-memory errors are simulated on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from vsstreamdiffvsr import StreamDiffVSR, StreamState
from vsstreamdiffvsr.errors import PrecisionFallbackWarning, TilingFallbackWarning
from vsstreamdiffvsr.pipeline.tiled import TilePlan, TiledRunner

from ..streams import frames_and_noise, run


@pytest.fixture
def fresh(tiny_ckpt: Path) -> StreamDiffVSR:
    """A pipeline of its own: what the out-of-memory ladders learn is kept per model, and must not reach the
    session's shared one."""
    return StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")


@pytest.mark.parametrize("tile", [None, 32])
def test_nan_in_half_precision_recomputes_in_float32(tiny_ckpt: Path, pipe: StreamDiffVSR,
                                                     monkeypatch: pytest.MonkeyPatch, tile: int | None) -> None:
    frames, noises = frames_and_noise(2, 32, 64)
    ref = run(pipe.with_options(tile=tile), frames, noises)
    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16", tile=tile)

    def poisoned(*args, **kwargs):
        return torch.full_like(args[0], float("nan"), dtype=half.dtype)

    monkeypatch.setattr(half.denoiser, "step_cold", poisoned)
    monkeypatch.setattr(half.denoiser, "step_warm", poisoned)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        out = run(half, frames, noises)
    assert half.stats["nan_fallbacks"] == 2 and half.model.tile_plans == {}  # recomputed with its own tiling
    fallback_warnings = [w for w in caught if issubclass(w.category, PrecisionFallbackWarning)]
    assert len(fallback_warnings) == 1  # one warning, not one per frame
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max()) <= 1e-5  # the float32 twin is loaded from the checkpoint


def test_views_share_one_float32_fallback_model(tiny_ckpt: Path) -> None:
    """Each upscale() call is a view of the shared pipeline: their NaN fallbacks load one float32 copy."""
    from vsstreamdiffvsr import weights

    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16")
    a, b = half.with_options(tile=32), half.with_options(flow="hr")
    loads = []
    real = weights.load_unet
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(weights, "load_unet", lambda *args: loads.append(args) or real(*args))
    try:
        ta, tb = a.model.float32(), b.model.float32()
    finally:
        monkeypatch.undo()
    assert ta is tb and len(loads) == 1 and next(ta.unet.parameters()).dtype == torch.float32


def test_out_of_memory_falls_back_to_tiles(pipe: StreamDiffVSR, fresh: StreamDiffVSR,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated CUDA OOM in the denoising of anything larger than a 32x32 latent: tiles shrink, and the
    denoising is tiled too, until the frame fits."""
    frames, noises = frames_and_noise(2, 64, 64)
    expected = run(pipe.with_options(tile=32, tile_overlap=16, tile_denoise=True), frames, noises)
    lean = fresh
    real_denoise = lean.denoiser.denoise

    def limited(z, x, warped, cond=None):
        if z.shape[-1] * z.shape[-2] > 32 * 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_denoise(z, x, warped, cond)

    monkeypatch.setattr(lean.denoiser, "denoise", limited)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(lean, frames, noises)
    assert lean.stats["oom_fallbacks"] == 1 and lean.tiler.plan_for(64, 64) == TilePlan((32, 32), True)
    assert lean.with_options(tile=48).tiler.plan_for(64, 64) == TilePlan((48, 48))  # kept for these options only
    assert any(issubclass(w.category, TilingFallbackWarning) for w in caught)
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-6
    strict = pipe.with_options(oom_fallback=False)
    monkeypatch.setattr(strict.denoiser, "denoise", limited)
    with pytest.raises(torch.OutOfMemoryError):
        run(strict, frames[:1], noises[:1])


def test_out_of_memory_everywhere_ends_in_one_clear_error(fresh: StreamDiffVSR,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that fits in no tiling: each setting that tiles the frame is tried once (none that would run
    it whole again), then one error naming the frame; the pipeline's tiling is left as it was."""
    frames, noises = frames_and_noise(1, 64, 64)
    lean = fresh
    tried = []

    def never(z, x, warped, cond=None):
        tried.append(tuple(z.shape[-2:]))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(lean.denoiser, "denoise", never)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(torch.OutOfMemoryError) as info:
        warnings.simplefilter("always")
        run(lean, frames, noises)
    assert "64x64 LR frame even in the smallest tiles" in str(info.value) and "2.00 GiB" in str(info.value)
    assert lean.tiler.plan_for(64, 64) == TilePlan() and lean.stats["tiled_frames"] == 0
    # whole; HR tiles of 48x80 (the denoising whole); the denoising in those tiles (48x64 inside the frame);
    # 32x40; 32x32. AUTO_TILE's 192x320 and the 96x160 after it are one tile here: skipped.
    assert tried == [(64, 64), (64, 64), (48, 64), (32, 40), (32, 32)]
    assert [str(w.message).split(";")[1].split(" LR")[0] for w in caught] == [
        " decoding (the denoising whole) in 48x80", " denoising and decoding in 48x80",
        " denoising and decoding in 32x40", " denoising and decoding in 32x32"]


def test_denoise_out_of_memory_keeps_the_allocators_message(pipe: StreamDiffVSR,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fallback off, the error a user sees says what the allocator said, without the failed
    attempt's traceback (and the tensors it holds) chained to it."""
    frames, noises = frames_and_noise(1, 64, 64)
    strict = pipe.with_options(tile=32, oom_fallback=False)

    def never(z, x, warped, cond=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(strict.denoiser, "denoise", never)
    with pytest.raises(torch.OutOfMemoryError) as info:
        run(strict, frames, noises)
    assert "whole-latent denoising" in str(info.value) and "2.00 GiB" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_out_of_memory_in_the_decoder_tiles_only_the_hr_stages(pipe: StreamDiffVSR, fresh: StreamDiffVSR,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where only the HR stages run out (decoding more than a 32x32 latent), the denoising stays whole."""
    frames, noises = frames_and_noise(2, 64, 64)
    expected = run(pipe.with_options(tile=32), frames, noises)
    lean = fresh
    real_decode = lean.components.vae.decode

    def limited(z, feats=None):
        if z.shape[-1] * z.shape[-2] > 32 * 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(z, feats)

    monkeypatch.setattr(lean.components.vae, "decode", limited)  # cold frames
    monkeypatch.setattr(lean.denoiser, "decode_warm", limited)  # warm frames
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(lean, frames, noises)
    assert lean.stats["oom_fallbacks"] == 1 and lean.tiler.plan_for(64, 64) == TilePlan((32, 32), False)
    assert any("decoding (the denoising whole)" in str(w.message) for w in caught)
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-6


def test_raft_out_of_memory_falls_back_to_lr_flow(pipe: StreamDiffVSR, fresh: StreamDiffVSR,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    frames, noises = frames_and_noise(3, 128, 128)
    expected = run(pipe.with_options(flow="lr"), frames, noises)
    lean = fresh
    real = lean.flow.flow_and_features
    hr_attempts, lr_eager = [], []

    def hr_too_big(x, x_prev, mode=None, corr=None, previous_features=None, eager=False):
        if (mode or "hr") == "hr":  # neither the full nor the lean correlation fits at HR
            hr_attempts.append(corr)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        lr_eager.append(eager)
        return real(x, x_prev, mode, corr, previous_features, eager)

    monkeypatch.setattr(lean.flow, "flow_and_features", hr_too_big)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(lean, frames, noises)
    assert lean.stats["lean_corr_fallbacks"] == 1 and lean.stats["lr_flow_fallbacks"] == 1
    assert hr_attempts == [None, "lean"]  # the second warm frame goes straight to the flow at LR
    assert lr_eager == [True, True]       # never a compile of RAFT at a new shape under memory pressure
    assert list(lean.model.flow_fallbacks.values()) == ["lr"]  # kept for this size and these flow options
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-6


def test_raft_out_of_memory_tries_lean_correlation_first(pipe: StreamDiffVSR, fresh: StreamDiffVSR,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    frames, noises = frames_and_noise(3, 32, 32)
    expected = run(pipe, frames, noises)
    lean = fresh
    real = lean.flow.flow_and_features
    full_attempts = []

    def full_too_big(x, x_prev, mode=None, corr=None, previous_features=None, eager=False):
        if corr != "lean":
            full_attempts.append(corr)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, x_prev, mode, corr, previous_features, eager)

    monkeypatch.setattr(lean.flow, "flow_and_features", full_too_big)
    out = run(lean, frames, noises)
    assert lean.stats["lean_corr_fallbacks"] == 1 and lean.stats["lr_flow_fallbacks"] == 0
    assert len(full_attempts) == 1  # the lean correlation that fitted is kept for the next frame
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-4


def test_nan_noise_is_refused_before_it_poisons_the_stream(pipe: StreamDiffVSR) -> None:
    from vsstreamdiffvsr.errors import NonFiniteInputError

    frames, noises = frames_and_noise(1, 32, 32)
    bad = noises[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="noise"):
        pipe.process_frame(frames[0], StreamState(), noise=bad)


def test_half_precision_vae_frames_fall_back_too(tiny_ckpt: Path, pipe: StreamDiffVSR,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """dtype float32 with a bf16 tiny VAE: a NaN frame is recomputed with a float32 copy of the VAE."""
    frames, noises = frames_and_noise(2, 32, 32)
    ref = run(pipe, frames, noises)
    from vsstreamdiffvsr.models.temporal_vae import TemporalTinyVAE

    lean = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", vae_dtype="bfloat16")
    real_decode = TemporalTinyVAE.decode

    def poisoned(self, z, feats=None):  # NaN from the half-precision VAE only, as an overflow would give
        out = real_decode(self, z, feats)
        return out * float("nan") if next(self.parameters()).dtype != torch.float32 else out

    monkeypatch.setattr(TemporalTinyVAE, "decode", poisoned)  # cold frames, and the fallback's float32 copy
    monkeypatch.setattr(lean.denoiser, "decode_warm", lean.components.vae.decode)  # warm (bound before the patch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionFallbackWarning)
        out = run(lean, frames, noises)
    assert lean.stats["nan_fallbacks"] == 2 and lean.model.float32().vae is not lean.components.vae
    said = {str(w.message) for w in caught if issubclass(w.category, PrecisionFallbackWarning)}
    assert said == {"vsstreamdiffvsr: tiny VAE bfloat16 produced NaN/Inf; frame recomputed in float32"}
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-5


def test_a_frame_nan_even_in_float32_is_an_error_not_a_state(tiny_ckpt: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from vsstreamdiffvsr.errors import NonFiniteOutputError

    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16")
    monkeypatch.setattr(TiledRunner, "run_planned",
                        lambda self, den, z, x, warped: torch.full((1, 3, 4 * x.shape[-2], 4 * x.shape[-1]),
                                                                   float("nan")))
    frames, noises = frames_and_noise(1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionFallbackWarning)
        with pytest.raises(NonFiniteOutputError, match="even in float32"):
            half.process_frame(frames[0], StreamState(), noise=noises[0])


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_a_non_finite_half_precision_flow_recomputes_the_frame_in_float32(pipe: StreamDiffVSR, poison: float,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN/Inf flow (a float16 overflow) makes the warped frame NaN: the flow itself is checked, with the
    output's one host sync, and the frame recomputed with a flow from float32 RAFT (one warning), also where
    RAFT is the only half-precision part; with nan_fallback=False the frame is an error, never delivered."""
    from vsstreamdiffvsr.errors import NonFiniteOutputError

    frames, noises = frames_and_noise(3, 32, 40, seed=4)
    ref = run(pipe, frames, noises)
    view = pipe.with_options(raft_dtype="bfloat16")
    net = view.components.raft(torch.bfloat16)
    real = net.flow_and_features

    def overflowing(*args, **kwargs):
        flow, features = real(*args, **kwargs)
        return torch.full_like(flow, poison), features

    monkeypatch.setattr(net, "flow_and_features", overflowing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionFallbackWarning)
        out = run(view, frames, noises)
    said = {str(w.message) for w in caught if issubclass(w.category, PrecisionFallbackWarning)}
    assert said == {"vsstreamdiffvsr: RAFT bfloat16 produced a NaN/Inf flow; frame recomputed in float32"}
    assert view.stats["nan_fallbacks"] == 2
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-5  # float32 RAFT's flow, float32 denoising: the reference frame
    unchecked = view.with_options(nan_fallback=False)
    _, state = unchecked.process_frame(frames[0], noise=noises[0])
    with pytest.raises(NonFiniteOutputError, match="nan_fallback=False"):  # never carried, never delivered
        unchecked.process_frame(frames[1], state, noise=noises[1])
    assert unchecked.stats["nan_fallbacks"] == 0


@pytest.mark.parametrize("where", ["weight", "prompt", "state"])
def test_non_finite_float32_output_is_an_error_not_a_frame(tiny_ckpt: Path, fresh: StreamDiffVSR, where: str) -> None:
    """float32 (the CPU default) checks its output too: a NaN weight (the U-Net's conv_out bias) or a NaN prompt
    embedding is an error naming the cause, and a NaN/Inf state handed in is refused before it is used."""
    from vsstreamdiffvsr.errors import NonFiniteInputError, NonFiniteOutputError

    frames, noises = frames_and_noise(2, 32, 32)
    _, good = fresh.process_frame(frames[0], noise=noises[0])
    if where == "weight":
        with torch.no_grad():
            fresh.components.unet.conv_out.bias[0] = float("nan")
    elif where == "prompt":
        fresh.components.prompt_embeds[0, 3, 0] = float("inf")
    if where == "state":
        bad = StreamState(good.prev_hq.clone(), good.prev_lq, good.frame_count)
        bad.prev_hq[0, 0, 0, 0] = float("nan")
        with pytest.raises(NonFiniteInputError, match="state holds NaN"):
            fresh.process_frame(frames[1], bad, noise=noises[1])
        return
    with pytest.raises(NonFiniteOutputError, match="in float32: the model weights"):
        fresh.process_frame(frames[1], good, noise=noises[1])
    assert fresh.stats["frames"] == 1

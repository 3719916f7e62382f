"""Speed and memory levers keep the picture: half precision, channels_last, compile, tiling, fallbacks.

Timings are never asserted here (see scripts/bench.py); these tests check correctness on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vsstreamdiffvsr import StreamDiffVSR, StreamState
from vsstreamdiffvsr.accel import GraphedCall, own_outputs
from vsstreamdiffvsr.errors import (CompileFallbackWarning, FlowGraphWarning, PrecisionFallbackWarning,
                                    TilingFallbackWarning)
from vsstreamdiffvsr.tiling import feather_weight, parse_tile, tile_layout


def frames_and_noise(n: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, h, w, generator=g) for _ in range(n)], [torch.randn(1, 4, h, w, generator=g)
                                                                     for _ in range(n)]


def run(pipe: StreamDiffVSR, frames, noises) -> list[torch.Tensor]:
    state, outs = StreamState(), []
    for f, z in zip(frames, noises):
        hq, state = pipe.process_frame(f, state, noise=z)
        outs.append(hq)
    return outs


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-20))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(tiny_ckpt: Path, pipe: StreamDiffVSR, dtype: str) -> None:
    frames, noises = frames_and_noise(2, 32, 32)
    ref = run(pipe, frames, noises)
    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype=dtype)
    assert half.unet.dtype == getattr(torch, dtype) and next(half.vae.parameters()).dtype == torch.float32
    out = run(half, frames, noises)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32
        assert 40.0 <= psnr(a, b) < 200.0  # close, and really computed in half precision


def test_channels_last_equals_contiguous(tiny_ckpt: Path, pipe: StreamDiffVSR) -> None:
    frames, noises = frames_and_noise(2, 32, 36)
    cl = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", channels_last=True)
    assert cl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(run(cl, frames, noises), run(pipe, frames, noises)):
        assert float((a - b).abs().max()) <= 1e-5


def test_compiled_equals_eager(pipe: StreamDiffVSR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile of the warm step and decoder (aot_eager backend: the CPU-affordable compile path
    that still traces our code through dynamo and AOTAutograd); cold frames stay eager."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    frames, noises = frames_and_noise(3, 32, 32)
    ref = run(pipe, frames, noises)
    compiled = pipe.with_options()
    compiled.enable_compile(mode="default", backend="aot_eager", cache_dir=tmp_path / "inductor")
    assert compiled.compiled and not pipe.compiled and compiled._worker is None
    assert getattr(compiled._step_cold, "__func__", None) is StreamDiffVSR._eager_step_cold  # cold stays eager
    assert getattr(compiled._step_warm, "__func__", None) is not StreamDiffVSR._eager_step_warm
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    for a, b in zip(run(compiled, frames, noises), ref):
        assert float((a - b).abs().max()) <= 1e-5
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_compiled_tiles_equal_eager_tiles(pipe: StreamDiffVSR, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Cropped HR tiles under compile (CUDA-graph mode's call path; aot_eager): one shape per compiled stage."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    frames, noises = frames_and_noise(2, 64, 160)
    ref = run(pipe.with_options(tile=128), frames, noises)
    compiled = pipe.with_options(tile=128)
    compiled.enable_compile(backend="aot_eager", cache_dir=tmp_path / "inductor")
    out = run(compiled, frames, noises)
    assert compiled.stats["tiled_frames"] == 2
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-5
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def _broken_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> None:
    """A torch.compile backend that fails as inductor does on a machine without a working Triton."""
    raise RuntimeError("Cannot find a working triton installation. Either the package is not installed or it "
                       "is too old.\nMore information may be found here.")


def test_a_failing_compiler_leaves_the_pipeline_eager_with_one_warning(pipe: StreamDiffVSR, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails on this machine (no Triton, no C++ compiler, a compiler bug) costs a warning
    and the compile's speed, not the clip: the denoising and the flow each warn once and run eagerly, with
    the eager numbers, also in views made later."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    frames, noises = frames_and_noise(3, 32, 32)
    ref = run(pipe, frames, noises)
    broken = pipe.with_options()
    broken.enable_compile(mode="default", backend=_broken_compiler, cache_dir=tmp_path / "inductor")
    broken.enable_flow_compile(backend=_broken_compiler, cache_dir=tmp_path / "inductor")
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(broken, frames, noises)
        again = run(broken.with_options(tile=None), frames, noises)  # a view: the same compiled sets
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 2, fallbacks
    assert any("for the denoising" in m for m in fallbacks) and any("for the optical flow" in m for m in fallbacks)
    assert all("Cannot find a working triton installation" in m for m in fallbacks)
    assert any("denoising" in m and "compile=False skips" in m for m in fallbacks)
    assert any("optical flow" in m and "compile_flow=False skips" in m for m in fallbacks)
    assert all("\n" not in m for m in fallbacks)  # one line each
    for a, b, c in zip(out, again, ref):
        assert torch.equal(a, c) and torch.equal(b, c)
    torch._dynamo.reset()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_compile_fallback_passes_on_what_is_not_a_compile_failure() -> None:
    """The model's own errors, and running out of memory while compiling (which the out-of-memory fallback
    handles by tiling), propagate: only a compiler's failure turns the functions eager."""
    from vsstreamdiffvsr.accel import CompileFallback

    def oom_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory while autotuning")

    def runtime_failure(gm: torch.fx.GraphModule, example_inputs: list):
        def fails(*args):
            raise ValueError("a bad input the eager code rejects too")
        return fails

    def eager(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    x = torch.ones(3)
    for backend, error in ((oom_compiler, torch.OutOfMemoryError), (runtime_failure, ValueError)):
        torch._dynamo.reset()
        fallback = CompileFallback("a test", "compile=False")
        call = fallback.wrap(torch.compile(eager, backend=backend), eager)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)
            with pytest.raises(error):
                call(x)
        assert not fallback.failed
    torch._dynamo.reset()
    fallback = CompileFallback("a test", "compile=False")
    call = fallback.wrap(torch.compile(eager, backend=_broken_compiler), eager)
    with pytest.warns(CompileFallbackWarning, match="for a test"):
        assert torch.equal(call(x), eager(x))
    assert fallback.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # once only
        assert torch.equal(call(x), eager(x))
    torch._dynamo.reset()


def test_compile_on_cuda_without_triton_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyPI's torch for Windows has no Triton: compile=True says so at upscale() time, with the fix."""
    import torch.utils._triton as triton_util

    from vsstreamdiffvsr.accel import check_compiler

    monkeypatch.setattr(triton_util, "has_triton", lambda: False)
    with pytest.raises(ValueError, match=r"needs Triton.*triton-windows.*compile=False"):
        check_compiler(torch.device("cuda"), "inductor")
    check_compiler(torch.device("cpu"), "inductor")  # inductor's CPU code needs no Triton
    check_compiler(torch.device("cuda"), "aot_eager")
    monkeypatch.setattr(triton_util, "has_triton", lambda: True)
    check_compiler(torch.device("cuda"), "inductor")


def test_cuda_graph_modes_mark_steps_and_copy_outputs(pipe: StreamDiffVSR, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """reduce-overhead: each compiled call starts a graph generation and hands back copies (same numbers)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        lambda: marks.append(threading.current_thread().name))
    frames, noises = frames_and_noise(3, 32, 32)
    ref = run(pipe, frames, noises)
    graphed = pipe.with_options()
    graphed.enable_compile(backend="aot_eager", cache_dir=tmp_path / "inductor")  # reduce-overhead by default
    assert graphed.compile_mode == "reduce-overhead"
    state, out = StreamState(), []
    for i in range(3):  # frame 0 from this thread, frames 1 and 2 from two other threads
        box: list = []
        call = lambda: box.append(graphed.process_frame(frames[i], state, noise=noises[i]))  # noqa: B023, E731
        if i == 0:
            call()
        else:
            worker = threading.Thread(target=call)
            worker.start()
            worker.join()
        (hq, state), = box
        out.append(hq)
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-5
    assert len(marks) == 2 * (4 + 1 + 1 + 1)  # each warm frame: 4 steps, TPM features, ARTG embedding, decoder
    announced = capfd.readouterr()
    assert announced.out == "" and announced.err.count("compiling the denoising (reduce-overhead) for 32x32 input") == 1
    assert set(marks) == {graphed._worker.thread_name}  # all on the pipeline's one thread
    assert graphed._worker.thread_name.startswith("vsstreamdiffvsr")
    again = pipe.with_options(tile=64)  # another view (a second upscale() call, a reloaded script)
    again.enable_compile(backend="aot_eager", cache_dir=tmp_path / "inductor")
    assert again._step_warm is graphed._step_warm and again._worker is graphed._worker  # nothing recompiled
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_graphed_pipelines_share_one_worker_per_device(tiny_ckpt: Path, pipe: StreamDiffVSR, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A second loaded model (another dtype, a reloaded script) runs on the same thread: one graph tree."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    other = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16")
    a, b = pipe.with_options(), other.with_options()
    for p in (a, b):
        p.enable_compile(backend="aot_eager", cache_dir=tmp_path / "inductor")
    assert a._worker is b._worker and a._step_warm is not b._step_warm
    frames, noises = frames_and_noise(2, 32, 32)
    assert len(run(b, frames, noises)) == 2
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_worker_threads_get_cudagraph_tree_state() -> None:
    """torch < 2.13 set the graph trees' thread-local state only on the importing thread (pytorch#123177)."""
    from torch._inductor import cudagraph_trees as trees

    from vsstreamdiffvsr.accel import cudagraph_tree_tls

    seen: dict[str, bool] = {}

    def probe(key: str, prepare: bool) -> None:
        if prepare:
            cudagraph_tree_tls()
        seen[key] = (hasattr(trees.local, "tree_manager_containers")
                     or torch._C._is_key_in_tls("tree_manager_containers"))
        if prepare:
            trees.get_container(0)  # what a graphed call looks up first; asserts on torch < 2.13 without it

    for key, prepare in (("bare", False), ("prepared", True)):
        t = threading.Thread(target=probe, args=(key, prepare))
        t.start()
        t.join()
    assert seen == {"bare": False, "prepared": True}


def test_cudnn_autotune_defaults(pipe: StreamDiffVSR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA: on for eager and "default" compile, off under CUDA graphs (its warm-up peak); explicit wins."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    views = {}
    for mode in (None, "default", "reduce-overhead"):
        v = pipe.with_options()
        if mode:
            v.enable_compile(mode=mode, backend="aot_eager", cache_dir=tmp_path / "inductor")
        v.device = torch.device("cuda")  # the property only reads it
        views[mode] = v.cudnn_benchmark
    assert views == {None: True, "default": True, "reduce-overhead": False}
    v.cudnn_benchmark = True
    assert v.cudnn_benchmark is True
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_flow_lr_is_upsampled_raft_at_lr(pipe: StreamDiffVSR) -> None:
    g = torch.Generator().manual_seed(3)
    x, xp = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1, torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    with torch.inference_mode():
        got = pipe.compute_flow(x, xp, mode="lr")
        want = F.interpolate(pipe.raft.raft(x, xp, num_flow_updates=12)[-1], scale_factor=4, mode="bilinear",
                             align_corners=False) * 4
    assert got.shape == (1, 2, 512, 512)
    assert float((got - want).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match='flow="lr"'):
        pipe.compute_flow(x[..., :64, :64], xp[..., :64, :64], mode="lr")
    with pytest.raises(ValueError, match="flow"):
        pipe.with_options(flow="quarter")


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
        parse_tile(30)
    with pytest.raises(ValueError):
        parse_tile((64, 20))


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
    assert pipe.with_options(tile=64, tile_overlap=32, tile_denoise=True).tile_denoise
    shrunk = pipe.with_options(tile=64, tile_overlap=32, tile_denoise=True)
    shrunk.tile = (32, 32)  # as the out-of-memory fallback leaves it: the overlap is capped in the layout
    assert shrunk.with_options(raft_corr="full").tile == (32, 32)


def _local_stand_ins(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Local stand-ins for the model's stages: the decoder sees k x k pixels around a pixel (a margin
    of context is what makes a cropped tile exact; blended tiles are exact only for pointwise stages)."""
    def denoise(z, x, warped, cond=None):
        if cond is None and warped is not None:
            cond = pipe._embed(warped)
        return z * 0.5 + x[:, :1] + (0 if cond is None else cond[:, :1])

    def decode(z, feats):
        up = F.interpolate(F.avg_pool2d(z[:, :3], k, 1, k // 2), scale_factor=4, mode="nearest")
        return up if feats is None else up + F.avg_pool2d(feats[0], k, 1, k // 2)

    monkeypatch.setattr(pipe, "denoise", denoise)
    monkeypatch.setattr(pipe, "_embed", lambda w: F.avg_pool2d(w, 4))
    monkeypatch.setattr(pipe, "_features", lambda w: [w * 0.25])
    monkeypatch.setattr(pipe, "_decode", decode)
    monkeypatch.setattr(pipe.vae, "decode", decode)


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
        whole = tiled._run(z, x, w, None)
        parts = tiled._run(z, x, w, (32, 32), tile_denoise)
        assert float((whole - parts).abs().max()) <= 1e-5
    assert tiled.stats["tiled_frames"] == 2


def test_crop_layout_cores_partition_the_frame_inside_their_margins() -> None:
    from vsstreamdiffvsr.tiling import crop_layout

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


@pytest.mark.parametrize(("h", "w"), [(64, 160), (68, 164)])  # the second: multiples of 4, not of 8
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


@pytest.mark.parametrize("tile", [None, 32])
def test_nan_in_half_precision_recomputes_in_float32(tiny_ckpt: Path, pipe: StreamDiffVSR,
                                                     monkeypatch: pytest.MonkeyPatch, tile: int | None) -> None:
    frames, noises = frames_and_noise(2, 32, 64)
    ref = run(pipe.with_options(tile=tile), frames, noises)
    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16", tile=tile)

    def poisoned(*args, **kwargs):
        return torch.full_like(args[0], float("nan"), dtype=half.dtype)

    monkeypatch.setattr(half, "_step_cold", poisoned)
    monkeypatch.setattr(half, "_step_warm", poisoned)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        out = run(half, frames, noises)
    assert half.stats["nan_fallbacks"] == 2 and half.tile == parse_tile(tile)  # recomputed with its tiling
    fallback_warnings = [w for w in caught if issubclass(w.category, PrecisionFallbackWarning)]
    assert len(fallback_warnings) == 1  # one warning, not one per frame
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max()) <= 1e-5  # the float32 twin is loaded from the checkpoint


def test_views_share_one_float32_fallback_model(tiny_ckpt: Path) -> None:
    """Each upscale() call is a view of the shared pipeline: their NaN fallbacks load one float32 copy."""
    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16")
    a, b = half.with_options(tile=32), half.with_options(flow="hr")
    ta, tb = a._fp32(), b._fp32()
    assert ta.unet is tb.unet and ta.controlnet is tb.controlnet
    assert next(ta.unet.parameters()).dtype == torch.float32 and ta is not tb  # options stay per view


def test_cropped_tiles_with_the_embedding_kept_in_the_controlnet(pipe: StreamDiffVSR) -> None:
    """A model whose ControlNet keeps its conditioning embedding (BGR order) tiles as one that does not."""
    frames, noises = frames_and_noise(2, 64, 160)
    split = run(pipe.with_options(tile=128), frames, noises)
    inside = pipe.with_options(tile=128)
    inside.cond_embedding, inside._embed = None, lambda cond: cond
    controlnet = pipe.controlnet  # shared by every view; pytest's monkeypatch would delete a submodule on undo
    identity = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = pipe.cond_embedding
    try:
        out = run(inside, frames, noises)
    finally:
        controlnet.controlnet_cond_embedding = identity
    assert inside.stats["tiled_frames"] == 2
    for a, b in zip(out, split):
        assert float((a - b).abs().max()) <= 1e-5


def test_out_of_memory_falls_back_to_tiles(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated CUDA OOM in the denoising of anything larger than a 32x32 latent: tiles shrink, and the
    denoising is tiled too, until the frame fits."""
    frames, noises = frames_and_noise(2, 64, 64)
    expected = run(pipe.with_options(tile=32, tile_overlap=16, tile_denoise=True), frames, noises)
    lean = pipe.with_options()
    real_denoise = lean.denoise

    def limited(z, x, warped, cond=None):
        if z.shape[-1] * z.shape[-2] > 32 * 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_denoise(z, x, warped, cond)

    monkeypatch.setattr(lean, "denoise", limited)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(lean, frames, noises)
    assert lean.stats["oom_fallbacks"] == 1 and lean.tile == (32, 32) and lean.tile_denoise
    assert any(issubclass(w.category, TilingFallbackWarning) for w in caught)
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-6
    strict = pipe.with_options(oom_fallback=False)
    monkeypatch.setattr(strict, "denoise", limited)
    with pytest.raises(torch.OutOfMemoryError):
        run(strict, frames[:1], noises[:1])


def test_out_of_memory_everywhere_ends_in_one_clear_error(pipe: StreamDiffVSR,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that fits in no tiling: each setting that tiles the frame is tried once (none that would run
    it whole again), then one error naming the frame; the pipeline's tiling is left as it was."""
    frames, noises = frames_and_noise(1, 64, 64)
    lean = pipe.with_options()
    tried = []

    def never(z, x, warped, cond=None):
        tried.append(tuple(z.shape[-2:]))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(lean, "denoise", never)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(torch.OutOfMemoryError) as info:
        warnings.simplefilter("always")
        run(lean, frames, noises)
    assert "64x64 LR frame even in the smallest tiles" in str(info.value) and "2.00 GiB" in str(info.value)
    assert lean.tile is None and not lean.tile_denoise and lean.stats["tiled_frames"] == 0
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

    monkeypatch.setattr(strict, "denoise", never)
    with pytest.raises(torch.OutOfMemoryError) as info:
        run(strict, frames, noises)
    assert "whole-latent denoising" in str(info.value) and "2.00 GiB" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_hr_tiles_hold_one_tiles_features_at_a_time(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous tile's TPM features and decoder output are freed before the next tile's are made."""
    import weakref

    frames, noises = frames_and_noise(2, 64, 64)
    tiled = pipe.with_options(tile=32)
    real = tiled._features
    made, alive_at_call = [], []

    def features(w):
        alive_at_call.append(sum(r() is not None for r in made))
        out = real(w)
        made.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(tiled, "_features", features)
    run(tiled, frames, noises)
    assert len(alive_at_call) > 1 and not any(alive_at_call)


def test_out_of_memory_in_the_decoder_tiles_only_the_hr_stages(pipe: StreamDiffVSR,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where only the HR stages run out (decoding more than a 32x32 latent), the denoising stays whole."""
    frames, noises = frames_and_noise(2, 64, 64)
    expected = run(pipe.with_options(tile=32), frames, noises)
    lean = pipe.with_options()
    real_decode = lean.vae.decode

    def limited(z, feats=None):
        if z.shape[-1] * z.shape[-2] > 32 * 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(z, feats)

    monkeypatch.setattr(lean.vae, "decode", limited)  # cold frames
    monkeypatch.setattr(lean, "_decode", limited)      # warm frames
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(lean, frames, noises)
    assert lean.stats["oom_fallbacks"] == 1 and lean.tile == (32, 32) and not lean.tile_denoise
    assert any("decoding (the denoising whole)" in str(w.message) for w in caught)
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-6


def test_raft_out_of_memory_falls_back_to_lr_flow(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> None:
    frames, noises = frames_and_noise(3, 128, 128)
    expected = run(pipe.with_options(flow="lr"), frames, noises)
    lean = pipe.with_options()
    real = lean._flow_and_features
    hr_attempts, lr_eager = [], []

    def hr_too_big(x, x_prev, mode=None, corr=None, previous_features=None, eager=False):
        if (mode or "hr") == "hr":  # neither the full nor the lean correlation fits at HR
            hr_attempts.append(corr)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        lr_eager.append(eager)
        return real(x, x_prev, mode, corr, previous_features, eager)

    monkeypatch.setattr(lean, "_flow_and_features", hr_too_big)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(lean, frames, noises)
    assert lean.stats["lean_corr_fallbacks"] == 1 and lean.stats["lr_flow_fallbacks"] == 1
    assert hr_attempts == [None, "lean"]  # the second warm frame goes straight to the flow at LR
    assert lr_eager == [True, True]       # never a compile of RAFT at a new shape under memory pressure
    assert pipe._flow_fallbacks == {}     # kept by the view that fell back, not by its parent
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-6


def test_lean_correlation_matches_torchvision() -> None:
    from torchvision.models.optical_flow.raft import CorrBlock

    from vsstreamdiffvsr.models.flow import LeanCorrBlock

    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(1, 64, 16, 20, generator=g), torch.randn(1, 64, 16, 20, generator=g)
    ref, lean = CorrBlock(num_levels=4, radius=4), LeanCorrBlock(num_levels=4, radius=4, chunk_bytes=64 * 1024)
    ref.build_pyramid(f1, f2)
    lean.build_pyramid(f1, f2)
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(20.0), indexing="ij")[::-1])[None]
    coords = grid + 4 * torch.randn(1, 2, 16, 20, generator=g)  # some lookups fall outside the frame
    want, got = ref.index_pyramid(coords), lean.index_pyramid(coords)
    assert got.shape == want.shape == (1, 324, 16, 20)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_half_correlation_matches_torchvision() -> None:
    """float16 storage (float32 matmuls as on the CPU, float16 ones as on CUDA): rounding-level differences;
    float32 storage: the gather lookup equals grid_sample. Features whose products leave float16's range are
    scaled by a power of two and scaled back in the lookup: the same numbers, never inf."""
    from torchvision.models.optical_flow.raft import CorrBlock

    from vsstreamdiffvsr.models.flow import HalfCorrBlock

    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(1, 64, 16, 20, generator=g), torch.randn(1, 64, 16, 20, generator=g)
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(20.0), indexing="ij")[::-1])[None]
    coords = grid + 4 * torch.randn(1, 2, 16, 20, generator=g)  # some lookups fall outside the frame
    coords[0, :, 0, 0] = torch.tensor([3.0, 5.0])  # an exact integer position
    for scale in (1.0, 300.0):  # x300: products up to ~1e6, far beyond float16's 65504
        ref = CorrBlock(num_levels=4, radius=4)
        ref.build_pyramid(f1 * scale, f2 * scale)
        want = ref.index_pyramid(coords)
        for dtype, mm, tol in ((torch.float32, None, 1e-5), (torch.float16, None, 1e-3),
                               (torch.float16, torch.float16, 1e-3)):
            block = HalfCorrBlock(num_levels=4, radius=4, storage_dtype=dtype, matmul_dtype=mm,
                                  chunk_bytes=4 * 320 * 7)  # 7 rows per float32 chunk at level 0
            block.build_pyramid(f1 * scale, f2 * scale)
            assert [v.dtype for v in block.corr_pyramid] == [dtype] * 4
            assert all(bool(torch.isfinite(v).all()) for v in block.corr_pyramid)
            unscale = float(block._unscale)
            assert unscale == 1.0 if scale == 1.0 or dtype == torch.float32 else unscale in (2.0**k for k in range(1, 20))
            got = block.index_pyramid(coords)
            assert got.shape == want.shape == (1, 324, 16, 20) and got.dtype == torch.float32
            assert float((got - want).abs().max()) <= tol * float(want.abs().max()), (scale, dtype, mm)


def test_half_correlation_levels_are_products_with_the_pooled_second_features() -> None:
    """Level l is f1/sqrt(C) times the 2^l-pooled f2 (pooling is linear): the reference's pooled volume up to
    float32 rounding, rounded once to float16. On CUDA's route (float16 matmul inputs) each stored value is the
    float32 product of the inputs rounded to float16's 11 significant bits (TF32's), rounded once more."""
    from vsstreamdiffvsr.models.flow import HalfCorrBlock

    g = torch.Generator().manual_seed(3)
    f1, f2 = (7 * torch.randn(1, 256, 24, 32, generator=g) for _ in range(2))
    n = 24 * 32
    a = f1.reshape(256, n).T / 16
    vol = (a @ f2.reshape(256, n)).view(n, 1, 24, 32)  # the reference's order: the products, then pooling
    pooled_f2, ref = [f2], [vol.flatten(1)]
    for _ in range(3):
        vol, f = F.avg_pool2d(vol, 2, 2), F.avg_pool2d(pooled_f2[-1], 2, 2)
        ref.append(vol.flatten(1))
        pooled_f2.append(f)
    chunked = HalfCorrBlock(num_levels=4, radius=4, chunk_bytes=4 * n * 37)  # CPU: float32 matmuls, 37-row chunks
    direct = HalfCorrBlock(num_levels=4, radius=4, matmul_dtype=torch.float16)
    for block in (chunked, direct):
        block.build_pyramid(f1, f2)
    for level in range(4):
        want = ref[level]
        slack = 1e-5 * float(want.abs().max())  # float32 sums in another order
        got = chunked.corr_pyramid[level]
        assert got.dtype == torch.float16 and got.shape == want.shape
        assert bool(((got.float() - want).abs() <= 2**-11 * want.abs() + slack).all()), level
        rounded = a.half().float() @ pooled_f2[level].reshape(256, -1).half().float()
        got = direct.corr_pyramid[level].float()
        assert bool(((got - rounded).abs() <= 2**-11 * rounded.abs() + slack).all()), level
        # and the rounding of the inputs shows: float32 inputs would not meet that bound everywhere
        assert not bool(((want.half().float() - rounded).abs() <= 2**-11 * rounded.abs() + slack).all()), level


def test_lean_and_half_flow_equal_full_flow_and_auto_picks_by_size(pipe: StreamDiffVSR) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 40, generator=g) * 2 - 1
    xp = torch.roll(x, (1, 2), (2, 3))
    with torch.inference_mode():
        full = pipe.compute_flow(x, xp, corr="full")
        lean = pipe.compute_flow(x, xp, corr="lean")
        half = pipe.compute_flow(x, xp, corr="half")
    assert float((full - lean).abs().max()) <= 1e-4
    assert 0 < float((full - half).abs().max()) <= 2e-2  # float16 storage: close, not identical
    assert pipe.raft.raft.corr_block is pipe.raft._full_block  # restored after the call
    assert not pipe.raft._blocks["half"].corr_pyramid        # and the pyramid freed
    assert [pipe.corr_for(h, w) for h, w in ((720, 1280), (1088, 1920), (2160, 3840))] == ["full", "half", "lean"]
    assert pipe.with_options(raft_corr="half").corr_for(720, 1280) == "half"
    with pytest.raises(ValueError, match="raft_corr"):
        pipe.with_options(raft_corr="huge")


def test_raft_out_of_memory_tries_lean_correlation_first(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> None:
    frames, noises = frames_and_noise(3, 32, 32)
    expected = run(pipe, frames, noises)
    lean = pipe.with_options()
    real = lean._flow_and_features
    full_attempts = []

    def full_too_big(x, x_prev, mode=None, corr=None, previous_features=None, eager=False):
        if corr != "lean":
            full_attempts.append(corr)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, x_prev, mode, corr, previous_features, eager)

    monkeypatch.setattr(lean, "_flow_and_features", full_too_big)
    out = run(lean, frames, noises)
    assert lean.stats["lean_corr_fallbacks"] == 1 and lean.stats["lr_flow_fallbacks"] == 0
    assert len(full_attempts) == 1  # the lean correlation that fitted is kept for the next frame
    for a, b in zip(out, expected):
        assert float((a - b).abs().max()) <= 1e-4


def test_prefetched_flow_equals_inline_flow(pipe: StreamDiffVSR) -> None:
    frames, noises = frames_and_noise(3, 32, 32)
    inline = run(pipe, frames, noises)
    state, outs = StreamState(), []
    ticket = None
    for i, (f, z) in enumerate(zip(frames, noises)):
        if i % 2:  # before the frame, as a caller may; or from on_enqueued, as the filter does
            nxt = [pipe.prefetch_flow(frames[i + 1], f)] if i + 1 < len(frames) else []
            hq, state = pipe.process_frame(f, state, noise=z, flow=ticket)
        else:
            nxt, ready = [], pipe.inputs_ready()

            def queue(i: int = i, f: torch.Tensor = f, ready: object = ready) -> None:
                if i + 1 < len(frames):
                    nxt.append(pipe.prefetch_flow(frames[i + 1], f, ready=ready))

            hq, state = pipe.process_frame(f, state, noise=z, flow=ticket, on_enqueued=queue)
        outs.append(hq)
        ticket = nxt[0] if nxt else None
    for a, b in zip(outs, inline):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="flow must have shape"):
        pipe.process_frame(frames[1], state, noise=noises[1], flow=torch.zeros(1, 2, 64, 64))


def test_half_precision_vae_close_to_float32(tiny_ckpt: Path, pipe: StreamDiffVSR) -> None:
    frames, noises = frames_and_noise(2, 32, 32)
    ref = run(pipe, frames, noises)
    fast = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", vae_dtype="bfloat16")
    assert next(fast.vae.parameters()).dtype == torch.bfloat16
    for a, b in zip(run(fast, frames, noises), ref):
        assert a.dtype == torch.float32 and 35.0 <= psnr(a, b) < 200.0


def test_device_corr_block_equals_torchvision() -> None:
    from torchvision.models.optical_flow.raft import CorrBlock

    from vsstreamdiffvsr.models.flow import _full_corr_block

    g = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(1, 32, 16, 24, generator=g), torch.randn(1, 32, 16, 24, generator=g)
    ref, ours = CorrBlock(num_levels=4, radius=4), _full_corr_block(4, 4)
    ref.build_pyramid(f1, f2)
    ours.build_pyramid(f1, f2)
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")[::-1])[None]
    coords = grid + 3 * torch.randn(1, 2, 16, 24, generator=g)
    assert torch.equal(ours.index_pyramid(coords), ref.index_pyramid(coords))


def test_flow_lr_pads_to_multiples_of_8(pipe: StreamDiffVSR) -> None:
    """LR sizes are multiples of 4 (320x180 for 720p output); RAFT needs multiples of 8."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 132, 140, generator=g) * 2 - 1
    xp = torch.roll(x, (1, -2), (2, 3))
    with torch.inference_mode():
        flow = pipe.compute_flow(x, xp, mode="lr")
    assert flow.shape == (1, 2, 528, 560)
    assert torch.isfinite(flow).all()


def test_compiled_decoder_output_is_not_carried_by_reference(pipe: StreamDiffVSR, monkeypatch) -> None:
    """A CUDA-graph compiled decoder reuses its output buffer: the carried frame must be a copy (made where
    graphed calls are wrapped, so nothing downstream copies again)."""
    view = pipe.with_options()
    shared = torch.zeros(1, 3, 128, 128)

    def graph_like_decode(z, feats):
        shared.copy_(torch.rand(1, 3, 128, 128))
        return shared

    monkeypatch.setattr(view, "_decode", own_outputs(graph_like_decode))  # as enable_compile wraps it
    frames, noises = frames_and_noise(2, 32, 32)
    _, state = view.process_frame(frames[0], StreamState(), noise=noises[0])  # cold: eager decoder
    _, state = view.process_frame(frames[1], state, noise=noises[1])          # warm: the compiled one
    assert state.prev_hq is not None and state.prev_hq.data_ptr() != shared.data_ptr()
    assert torch.equal(state.prev_hq, shared)


def test_cudnn_and_tf32_flags_are_set_while_running_and_restored(pipe: StreamDiffVSR, monkeypatch) -> None:
    seen = []
    view = pipe.with_options()
    view.cudnn_benchmark, view.tf32 = True, True
    eager = view._eager_step_cold

    def spy(*args):
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32))
        return eager(*args)

    monkeypatch.setattr(view, "_step_cold", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a torch property object: monkeypatch cannot undo it
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        frames, noises = frames_and_noise(1, 32, 32)
        view.process_frame(frames[0], StreamState(), noise=noises[0])
        assert seen == [(True, True)] * 4
        assert torch.backends.cudnn.benchmark is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert pipe.cudnn_benchmark is False and pipe.tf32 is False  # CPU defaults


class CpuGraph(GraphedCall):
    """GraphedCall with its three CUDA operations stood in for on the CPU: "recording" remembers ``fn`` and a
    replay reruns it on the input buffers into the output buffer, as a replayed graph rewrites its memory."""

    made: list["CpuGraph"] = []

    def __init__(self, fn, *args, **kwargs) -> None:
        self.fn, self.recordings, self.replays = fn, 0, 0
        CpuGraph.made.append(self)
        super().__init__(fn, *args, **kwargs)

    def _new_graph(self) -> object:
        return object()

    @contextlib.contextmanager
    def _recording(self, graph):
        self.recordings += 1
        yield

    def _replay(self) -> None:
        self.replays += 1
        self.output.copy_(self.fn(*self.inputs))


def test_graphed_call_copies_inputs_in_and_outputs_out() -> None:
    g = CpuGraph(lambda a, b: a * 2 + b, torch.ones(2, 3), torch.zeros(2, 3))
    assert g.recordings == 1 and g.replays == 0
    a, b = torch.rand(2, 3), torch.rand(2, 3)
    first = g(a, b)
    assert torch.equal(first, a * 2 + b)
    second = g(b, a)  # a replay must not change what an earlier call returned
    assert torch.equal(second, b * 2 + a) and torch.equal(first, a * 2 + b)
    with pytest.raises(ValueError, match="keep their shape"):
        g(torch.ones(3, 3), b)
    with pytest.raises(TypeError, match="expected 2 tensors"):
        g(a)


def test_graphed_flow_equals_eager_flow_and_is_recorded_once_per_size(tiny_ckpt: Path) -> None:
    pipe = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    assert pipe.graph_flow is False  # the default
    pipe.graph_flow, pipe._graph_factory = True, CpuGraph  # stand in for CUDA
    CpuGraph.made.clear()
    frames, _ = frames_and_noise(4, 32, 32, seed=3)
    for prev, cur in zip(frames, frames[1:]):
        got = pipe.prefetch_flow(cur, prev).result()
        assert torch.equal(got, pipe.compute_flow(cur * 2 - 1, prev * 2 - 1))
    assert len(CpuGraph.made) == 1 and CpuGraph.made[0].replays == 3
    wide, _ = frames_and_noise(2, 32, 40)
    taller, _ = frames_and_noise(2, 40, 32)
    pipe.prefetch_flow(wide[1], wide[0])
    pipe.prefetch_flow(taller[1], taller[0])
    assert len(CpuGraph.made) == 3 and len(pipe._flow_graphs) == 2  # the oldest size's graph was dropped
    view = pipe.with_options(graph_flow=False)
    assert view._flow_graphs is pipe._flow_graphs and view.graph_flow is False
    view.prefetch_flow(wide[1], wide[0])
    assert len(CpuGraph.made) == 3 and CpuGraph.made[1].replays == 1  # graph_flow=False: eager, no replay
    with pytest.raises(ValueError, match="graph_flow=True needs a CUDA device"):
        pipe.with_options(graph_flow=True)


def test_flow_graph_that_cannot_be_recorded_falls_back_to_eager_once(tiny_ckpt: Path) -> None:
    pipe = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    pipe.graph_flow, pipe._graph_factory = True, failing
    frames, _ = frames_and_noise(3, 32, 32, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flows = [pipe.prefetch_flow(cur, prev).result() for prev, cur in zip(frames, frames[1:])]
    graph_warnings = [w for w in caught if issubclass(w.category, FlowGraphWarning)]
    assert len(graph_warnings) == 1 and "not permitted when stream is capturing" in str(graph_warnings[0].message)
    assert len(calls) == 1  # not retried on every frame
    for (prev, cur), got in zip(zip(frames, frames[1:]), flows):
        assert torch.equal(got, pipe.compute_flow(cur * 2 - 1, prev * 2 - 1))


def test_compiled_flow_equals_eager_flow(pipe: StreamDiffVSR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    """compile_flow: RAFT through torch.compile gives the eager flow; views share it; False turns it off."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    frames, _ = frames_and_noise(3, 32, 40, seed=6)
    view = pipe.with_options()
    view.enable_flow_compile(backend="aot_eager", cache_dir=tmp_path / "inductor")
    assert view.compile_flow and view._raft != pipe.raft.flow_and_features and not pipe.compile_flow
    with torch.inference_mode():
        for prev, cur in zip(frames, frames[1:]):
            x, xp = cur * 2 - 1, prev * 2 - 1
            assert float((view.compute_flow(x, xp) - pipe.compute_flow(x, xp)).abs().max()) <= 1e-4
    announced = capfd.readouterr()  # once per size, on stderr: a first compile takes a minute or more
    assert announced.out == "" and announced.err.count("compiling the optical flow (full correlation, RAFT at HR) for 40x32") == 1
    half = view.with_options(raft_corr="half")  # the float16 pyramid: its build eager inside the compiled flow
    with torch.inference_mode():
        x, xp = frames[1] * 2 - 1, frames[0] * 2 - 1
        assert float((half.compute_flow(x, xp) - pipe.with_options(raft_corr="half").compute_flow(x, xp))
                     .abs().max()) <= 1e-4
    low = view.with_options(raft_dtype="bfloat16")  # compiled parts of its own, around the bfloat16 networks
    assert low.compile_flow and low._raft is not view._raft
    assert view.with_options(raft_dtype="bfloat16")._raft is low._raft
    with torch.inference_mode():
        eager_low = pipe.with_options(raft_dtype="bfloat16").compute_flow(x, xp)
        assert float((low.compute_flow(x, xp) - eager_low).abs().max()) <= 1e-3
    again = view.with_options(tile=64)
    assert again._raft is view._raft  # shared, not compiled anew
    off = view.with_options(compile_flow=False)
    assert off._raft == pipe.raft.flow_and_features and not off.compile_flow
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


@pytest.mark.parametrize(("corr", "dtype"), [("full", "float32"), ("half", "float32"), ("lean", "float32"),
                                             ("half", "bfloat16")])
def test_each_raft_part_traces_whole(pipe: StreamDiffVSR, corr: str, dtype: str) -> None:
    """compile_flow compiles RAFT's parts (encoder, context, one update, upsampling): an unintended graph break
    (HalfCorrBlock's `assert tensor_list` once broke the 1080p flow into eager pieces) would leave part of
    RAFT uncompiled, silently. Also with RAFT's networks in half precision (raft_dtype)."""
    frames, _ = frames_and_noise(2, 32, 40, seed=6)
    x, xp = (f * 2 - 1 for f in frames)
    a, b = F.interpolate(x, scale_factor=4, mode="bicubic"), F.interpolate(xp, scale_factor=4, mode="bicubic")
    raft = pipe.with_options(raft_dtype=dtype)._raft_net()
    parts, block = raft.parts, raft._blocks[corr]
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            fmap1, fmap2 = raft.encode(a), raft.encode(b)
            block.build_pyramid(fmap1, fmap2)
            hidden, context = parts.context(a)
            gy, gx = torch.meshgrid(torch.arange(16), torch.arange(20), indexing="ij")
            coords0 = torch.stack((gx, gy)).float()[None]
            coords1 = coords0 + 0.5
            for fn, args in ((parts.encode, (a,)), (parts.context, (a,)),
                             (parts.update, (block, hidden, context, coords0, coords1)),
                             (parts.upsample, (hidden, coords0, coords1))):
                explained = torch._dynamo.explain(fn)(*args)
                assert (explained.graph_count, explained.graph_break_count) == (1, 0), (fn, explained.break_reasons)
    finally:
        block.release()
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_each_compiled_denoising_function_traces_whole(tiny_ckpt: Path, dtype: str) -> None:
    """compile=True compiles the warm step (ControlNet + U-Net), ARTG's embedding, the TPM encoder and the
    decoder, with fullgraph=False: a graph break (a diffusers update, a data-dependent branch of ours) would
    leave part of the denoising eager between CUDA graphs, silently and at a large cost. Each traces whole,
    in float32 and in the half precision CUDA defaults to."""
    pipe = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype=dtype)
    frames, noise = frames_and_noise(1, 32, 40, seed=7)
    x = (frames[0] * 2 - 1).to(pipe.dtype)
    warped = torch.rand(1, 3, 128, 160) * 2 - 1
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            cond = pipe.cond_embedding(warped.to(pipe.dtype))
            feats = pipe.vae.temporal_features(warped)
            for fn, args in ((pipe._eager_step_warm, (noise[0], x, pipe._t_tensors[0], cond)),
                             (pipe.cond_embedding, (warped.to(pipe.dtype),)),
                             (pipe.vae.temporal_features, (warped,)),
                             (pipe.vae.decode, (noise[0], feats))):
                explained = torch._dynamo.explain(fn)(*args)
                assert (explained.graph_count, explained.graph_break_count) == (1, 0), (fn, explained.break_reasons)
    finally:
        torch._dynamo.reset()


def test_compiled_raft_compiles_the_update_once(pipe: StreamDiffVSR, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The 12 updates run one compiled graph 12 times (a graph with them unrolled took most of a cold compile's
    time): four graphs in all (encoder, context, update, upsampling), and one more update per correlation."""
    from torch._dynamo.utils import counters

    frames, _ = frames_and_noise(3, 32, 40, seed=6)
    view = pipe.with_options()
    view.enable_flow_compile(backend="aot_eager", cache_dir=tmp_path / "inductor")
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.inference_mode():
            x0, x1, x2 = (f * 2 - 1 for f in frames)
            full = view.compute_flow(x1, x0)
            assert counters["stats"]["unique_graphs"] == 4
            assert float((full - pipe.compute_flow(x1, x0)).abs().max()) <= 1e-4
            view.compute_flow(x2, x1)  # another frame: no new graph
            assert counters["stats"]["unique_graphs"] == 4
            view.with_options(raft_corr="half").compute_flow(x2, x1)
            assert counters["stats"]["unique_graphs"] == 5  # the update with the float16 pyramid's lookup
    finally:
        torch._dynamo.reset()
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_compile_flow_follows_compile_on_cuda_only(tiny_ckpt: Path, pipe: StreamDiffVSR,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_flow=None: RAFT is compiled with the denoising on CUDA; on the CPU only when asked for; an
    explicit False holds for views that compile later."""
    import vsstreamdiffvsr.pipeline as pl
    from vsstreamdiffvsr.options import resolve_compile_flow

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_compile_flow(None, True, cuda) and not resolve_compile_flow(None, False, cuda)
    assert not resolve_compile_flow(None, True, cpu) and resolve_compile_flow(True, False, cpu)
    assert not resolve_compile_flow(False, True, cuda)

    flow_compiles: list[StreamDiffVSR] = []
    monkeypatch.setattr(StreamDiffVSR, "enable_flow_compile", lambda self, **kw: flow_compiles.append(self))

    def fake_compile(self, mode=pl.DEFAULT_COMPILE_MODE, cache_dir=None, backend="inductor"):
        self.compiled, self.compile_mode = True, mode

    monkeypatch.setattr(StreamDiffVSR, "enable_compile", fake_compile)
    # from_pretrained resolves the option it was given, with compile and the device (CUDA faked by the resolver)
    asked: list[tuple] = []
    monkeypatch.setattr(pl, "resolve_compile_flow", lambda v, c, d: asked.append((v, c, d.type)) or (v is None and c))
    loaded = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", compile=True)
    assert asked == [(None, True, "cpu")] and flow_compiles == [loaded] and loaded._compile_flow_opt is None
    monkeypatch.undo()
    monkeypatch.setattr(StreamDiffVSR, "enable_flow_compile", lambda self, **kw: flow_compiles.append(self))
    monkeypatch.setattr(StreamDiffVSR, "enable_compile", fake_compile)
    flow_compiles.clear()

    gpu = pipe.with_options()
    gpu.device = cuda  # the views below only read the device to resolve None
    followed = gpu.with_options(compile=True)
    assert followed.compiled and flow_compiles == [followed]
    assert not gpu.with_options(compile=True, compile_flow=False).compile_flow and len(flow_compiles) == 1
    told_not = gpu.with_options(compile_flow=False)
    assert told_not.with_options(compile=True).compiled and len(flow_compiles) == 1  # False holds
    gpu.device = cpu
    assert gpu.with_options(compile=True).compiled and len(flow_compiles) == 1  # CPU: only when asked for


def test_lean_correlation_flow_stays_eager_under_compile_flow(pipe: StreamDiffVSR) -> None:
    """The lean correlation's chunked lookups unroll into a large graph (on this CPU at a 256x320 input: 7 min
    with the 12 updates unrolled, 49 s for one update, more at 4K): with compile_flow it runs eagerly; the other
    correlations use the compiled RAFT."""
    frames, _ = frames_and_noise(2, 32, 40, seed=6)
    x, xp = (f * 2 - 1 for f in frames)
    view = pipe.with_options()
    calls: list[str] = []

    def compiled_raft(*args, corr: str, **kwargs):
        calls.append(corr)
        return view.raft.flow_and_features(*args, corr=corr, **kwargs)

    view._raft, view.compile_flow = compiled_raft, True
    with torch.inference_mode():
        for corr in ("full", "half", "lean"):
            view.raft_corr = corr
            view.compute_flow(x, xp)
    assert calls == ["full", "half"]


def test_prefetch_reuses_the_previous_frames_raft_features(pipe: StreamDiffVSR) -> None:
    """after=: frame i's RAFT feature map, made for flow(i, i-1), serves flow(i+1, i); same output."""
    frames, noises = frames_and_noise(4, 32, 32, seed=8)
    inline = run(pipe, frames, noises)
    encoded: list[int] = []
    hook = pipe.raft.raft.feature_encoder.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0]))
    try:
        state, outs, ticket = StreamState(), [], None
        for i, (f, z) in enumerate(zip(frames, noises)):
            nxt: list = []

            def queue(i: int = i, f: torch.Tensor = f, after: object = ticket) -> None:
                if i + 1 < len(frames):
                    nxt.append(pipe.prefetch_flow(frames[i + 1], f, after=after))

            hq, state = pipe.process_frame(f, state, noise=z, flow=ticket, on_enqueued=queue)
            outs.append(hq)
            ticket = nxt[0] if nxt else None
        assert encoded == [1, 1, 1, 1]  # flow(1, 0) encodes both frames, flow(2, 1) and flow(3, 2) one each
        for a, b in zip(outs, inline):
            assert torch.equal(a, b)
        encoded.clear()  # a ticket made for another tensor (even an equal one) is not trusted
        pipe.prefetch_flow(frames[3], frames[2].clone(), after=ticket)
        assert encoded == [1, 1]
    finally:
        hook.remove()


def test_run_flags_of_two_pipelines_on_two_threads_restore_the_users_values() -> None:
    """A enters, B enters, A leaves, B leaves (two models with locks of their own): the user's flags come back
    at the end, and B keeps its own while it runs."""
    from vsstreamdiffvsr.accel import run_flags

    user = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def pipeline_a() -> None:
        with run_flags(True, True):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def pipeline_b() -> None:
        a_in.wait(5)
        with run_flags(False, False):
            b_in.set()
            a_out.wait(5)
            seen.append((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32))

    threads = [threading.Thread(target=pipeline_a), threading.Thread(target=pipeline_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [(False, False)]
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == user


def test_run_flags_with_torchs_newer_tf32_api(tmp_path: Path) -> None:
    """A process that set TF32 through fp32_precision: reading the legacy flag would raise ("mix of the legacy
    and new APIs"), so the flags are kept in the new API (a subprocess: the choice is process-wide)."""
    code = (
        "import torch\n"
        "from vsstreamdiffvsr.accel import run_flags\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "with run_flags(False, False):\n"
        "    assert torch.backends.cuda.matmul.fp32_precision == 'ieee'\n"
        "assert torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_compile_cache_tells_the_users_setting_from_torchs_default(tmp_path: Path) -> None:
    """torch writes its /tmp default into TORCHINDUCTOR_CACHE_DIR the first time inductor runs; only a value
    the user set before importing us is theirs to keep."""
    code = (
        "import os\n"
        "from vsstreamdiffvsr.accel import compile_cache\n"
        "os.environ['TORCHINDUCTOR_CACHE_DIR'] = '/tmp/torchinductor_someone'  # as torch does\n"
        "print(compile_cache())\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(tmp_path / "cache" / "vsstreamdiffvsr" / "inductor")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.stdout.strip() == str(tmp_path / "mine"), res.stderr[-2000:]


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
    monkeypatch.setattr(lean, "_decode", lean.vae.decode)      # warm frames (bound before the patch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionFallbackWarning)
        out = run(lean, frames, noises)
    assert lean.stats["nan_fallbacks"] == 2 and lean._fp32().vae is not lean.vae
    said = {str(w.message) for w in caught if issubclass(w.category, PrecisionFallbackWarning)}
    assert said == {"vsstreamdiffvsr: tiny VAE bfloat16 produced NaN/Inf; frame recomputed in float32"}
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-5


def test_a_frame_nan_even_in_float32_is_an_error_not_a_state(tiny_ckpt: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from vsstreamdiffvsr.errors import NonFiniteOutputError

    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16")
    monkeypatch.setattr(StreamDiffVSR, "_run_or_tile",
                        lambda self, z, x, warped: torch.full((1, 3, 4 * x.shape[-2], 4 * x.shape[-1]), float("nan")))
    frames, noises = frames_and_noise(1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionFallbackWarning)
        with pytest.raises(NonFiniteOutputError, match="even in float32"):
            half.process_frame(frames[0], StreamState(), noise=noises[0])


@pytest.mark.parametrize(("call", "needle"), [
    (lambda p, f: p.prefetch_flow(f.permute(0, 2, 3, 1), f), "lq must have shape (1,3,h,w)"),
    (lambda p, f: p.prefetch_flow(f, [f]), "lq_prev must be a torch.Tensor"),
    (lambda p, f: p.prefetch_flow(f, f[..., :32, :32]), "differ in size"),
    (lambda p, f: p.prefetch_flow((f * 255).to(torch.uint8), f), "divide 8-bit data by 255"),
    (lambda p, f: p.prefetch_flow(f, f, after="ticket"), "after must be the FlowTicket"),
    (lambda p, f: p.process_frame(f, flow=f.numpy()), "flow must be a FlowTicket"),
    (lambda p, f: p.process_frame(f, generator="x"), "generator must be a torch.Generator"),
    (lambda p, f: p.process_frame(f, on_enqueued=1), "on_enqueued must be callable"),
])
def test_bad_calls_are_plain_value_errors(pipe: StreamDiffVSR, call, needle: str) -> None:
    frame = torch.rand(1, 3, 32, 48)
    frames_before = pipe.stats["frames"]
    with pytest.raises(ValueError) as info:
        call(pipe, frame)
    assert needle in str(info.value) and pipe.stats["frames"] == frames_before  # refused before any work


def test_a_graphed_call_under_the_models_lock_is_an_error_not_a_deadlock(pipe: StreamDiffVSR) -> None:
    """The worker thread takes the model's lock; a caller already holding it would wait forever."""
    from vsstreamdiffvsr.accel import Worker

    graphed = pipe.with_options()
    graphed._worker = Worker(torch.device("cpu"))  # as compile_mode="reduce-overhead" sets it
    frames, noises = frames_and_noise(1, 32, 32)
    outcome = []

    def call() -> None:
        with graphed.lock:
            try:
                graphed.process_frame(frames[0], noise=noises[0])
                outcome.append("returned")
            except RuntimeError as exc:
                outcome.append(str(exc))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(60)
    assert outcome and "holds the model's lock" in outcome[0], outcome or "deadlocked"
    hq, _ = graphed.process_frame(frames[0], noise=noises[0])  # without the lock held: runs on the worker
    assert hq.shape == (1, 3, 128, 128)


def test_half_precision_raft_is_a_view_option_close_to_float32(tiny_ckpt: Path, pipe: StreamDiffVSR) -> None:
    """raft_dtype: RAFT's networks in half precision, one copy shared by every view, the flow and the picture
    close to float32 RAFT's; from_pretrained takes it too, and a bad value is refused naming the option."""
    frames, noises = frames_and_noise(3, 32, 40, seed=3)
    ref = run(pipe, frames, noises)
    view = pipe.with_options(raft_dtype="bfloat16")  # (CPU float16 convolutions are slow; same code path)
    assert view.raft_dtype == torch.bfloat16 and pipe.raft_dtype == torch.float32
    net = view._raft_net()
    assert next(net.raft.parameters()).dtype == torch.bfloat16
    assert next(pipe.raft.raft.parameters()).dtype == torch.float32 and pipe._raft_net() is pipe.raft
    assert pipe.with_options(raft_dtype=torch.bfloat16)._raft_net() is net  # made once, shared
    assert view.with_options(tile=64).raft_dtype == torch.bfloat16  # kept by views of the view
    out = run(view, frames, noises)
    with torch.inference_mode():
        x, xp = frames[1] * 2 - 1, frames[0] * 2 - 1
        moved = float((view.compute_flow(x, xp) - pipe.compute_flow(x, xp)).abs().max())
    assert 0.0 < moved <= 0.5
    assert torch.equal(out[0], ref[0])  # a cold frame has no flow
    for a, b in zip(out[1:], ref[1:]):
        assert a.dtype == torch.float32 and 30.0 <= psnr(a, b) < 200.0
    loaded = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", raft_dtype="bfloat16")
    assert loaded.raft_dtype == torch.bfloat16 and next(loaded._raft_net().raft.parameters()).dtype == torch.bfloat16
    for bad in ("float64", "half-ish", 16):
        with pytest.raises(ValueError, match="raft_dtype must be None, float32, float16 or bfloat16"):
            pipe.with_options(raft_dtype=bad)


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_a_non_finite_half_precision_flow_recomputes_the_frame_in_float32(pipe: StreamDiffVSR, poison: float,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN/Inf flow (a float16 overflow) makes the warped frame NaN: the flow itself is checked, with the
    output's one host sync, and the frame recomputed with a flow from float32 RAFT (one warning), also where
    RAFT is the only half-precision part; nan_fallback=False leaves the frame as it comes."""
    frames, noises = frames_and_noise(3, 32, 40, seed=4)
    ref = run(pipe, frames, noises)
    view = pipe.with_options(raft_dtype="bfloat16")
    net = view._raft_net()
    real = net.flow_and_features

    def overflowing(*args, **kwargs):
        flow, features = real(*args, **kwargs)
        return torch.full_like(flow, poison), features

    monkeypatch.setattr(net, "flow_and_features", overflowing)
    view = view.with_options()  # takes the patched entry point
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionFallbackWarning)
        out = run(view, frames, noises)
    said = {str(w.message) for w in caught if issubclass(w.category, PrecisionFallbackWarning)}
    assert said == {"vsstreamdiffvsr: RAFT bfloat16 produced a NaN/Inf flow; frame recomputed in float32"}
    assert view.stats["nan_fallbacks"] == 2
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-5  # float32 RAFT's flow, float32 denoising: the reference frame
    unchecked = view.with_options(nan_fallback=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionFallbackWarning)
        out = run(unchecked, frames[:2], noises[:2])
    assert not caught and unchecked.stats["nan_fallbacks"] == 0
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()  # what the check is there for

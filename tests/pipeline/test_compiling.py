"""Speed levers keep the picture: half precision, channels_last, torch.compile of the denoising and of RAFT (the
``aot_eager`` backend stands in for inductor on the CPU: it traces our code through dynamo and AOTAutograd), its
eager fallback, the CUDA-graph modes' step marks and output copies, the compiler check, the kernel cache folder,
and what ``compile=None`` / ``compile_flow=None`` resolve to.

Timings are never asserted here (see scripts/bench.py); these tests check correctness on the CPU. The worker
thread, the model's lock and the cuDNN/TF32 flags are tested in test_runtime.py.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from vsstreamdiffvsr import StreamDiffVSR, StreamState
from vsstreamdiffvsr import options as options_module
from vsstreamdiffvsr.errors import CompileFallbackWarning
from vsstreamdiffvsr.options import Options
from vsstreamdiffvsr.pipeline import compiling
from vsstreamdiffvsr.pipeline.compiling import CompileFallback, check_compiler, compile_cache, own_outputs

from ..streams import frames_and_noise, psnr, run

_CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@pytest.fixture
def cache_env() -> Iterator[None]:
    """compile_cache writes the kernel-cache variables into the environment: unset during the test, restored after."""
    saved = {name: os.environ.pop(name, None) for name in _CACHE_VARS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def aot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_env: None) -> Iterator[dict[str, Path]]:
    """Compiled paths on the CPU: every torch.compile with aot_eager, dynamo's caches and counters fresh (and
    cleared after), a kernel-cache folder of the test's own; yields the options that name that folder."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield {"compile_cache_dir": tmp_path / "inductor"}
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture
def fresh(tiny_ckpt: Path) -> StreamDiffVSR:
    """A model of its own: compiled sets, compile notices and fallbacks are kept per model, and must not reach the
    session's shared one."""
    return StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")


def graphs() -> int:
    """Graphs dynamo compiled since the last reset (one per compiled function and input shape, unless it breaks)."""
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def ref32(pipe: StreamDiffVSR) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Two 32x32 frames, their noise, and the eager float32 outputs of the stream (computed once for the module)."""
    frames, noises = frames_and_noise(2, 32, 32)
    return frames, noises, run(pipe, frames, noises)


# ---------------------------------------------------------------------------------------------- precision, layout

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(tiny_ckpt: Path, ref32: tuple, dtype: str) -> None:
    frames, noises, ref = ref32
    half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype=dtype)
    c = half.components
    assert c.unet.dtype == c.controlnet.dtype == getattr(torch, dtype)
    assert next(c.vae.parameters()).dtype == torch.float32  # the tiny VAE stays float32 unless asked
    out = run(half, frames, noises)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32
        assert 40.0 <= psnr(a, b) < 200.0  # close, and really computed in half precision


def test_half_precision_vae_close_to_float32(tiny_ckpt: Path, ref32: tuple) -> None:
    frames, noises, ref = ref32
    fast = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", vae_dtype="bfloat16")
    assert next(fast.components.vae.parameters()).dtype == torch.bfloat16
    for a, b in zip(run(fast, frames, noises), ref):
        assert a.dtype == torch.float32 and 35.0 <= psnr(a, b) < 200.0


def test_channels_last_equals_contiguous(tiny_ckpt: Path, pipe: StreamDiffVSR, ref32: tuple) -> None:
    frames, noises, ref = ref32
    cl = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", channels_last=True)
    assert cl.options.nhwc and not pipe.options.nhwc
    assert cl.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(run(cl, frames, noises), ref):
        assert float((a - b).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------------- the compiled denoising

def test_compiled_equals_eager_in_a_cuda_graph_mode(fresh: StreamDiffVSR, ref32: tuple, aot: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """compile=True (reduce-overhead, the default mode) compiles the warm step, ARTG's embedding, the TPM encoder
    and the warm decoder, each one whole graph (a graph break would leave part of the denoising eager between
    CUDA graphs, silently); a cold frame (one per start, seek or scene cut) compiles nothing. Each compiled call
    starts a graph generation and hands back copies, on the pipeline's worker thread whichever thread calls; the
    numbers are the eager ones. Another view reuses the compiled set and the worker."""
    marks: list[str] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        lambda: marks.append(threading.current_thread().name))
    frames, noises, ref = ref32
    graphed = fresh.with_options(compile=True, **aot)
    assert graphed.options.compile_mode == "reduce-overhead" and graphed.options.uses_cuda_graphs
    assert graphed.options.compiled and not fresh.options.compiled
    assert graphed.worker is not None and fresh.worker is None
    c, eager, den = fresh.components, fresh.denoiser, graphed.denoiser
    assert (eager.decode_warm, eager.features, eager.embed) == (c.vae.decode, c.vae.temporal_features,
                                                                c.cond_embedding)
    assert den.decode_warm != c.vae.decode and den.features != c.vae.temporal_features  # the compiled entries
    assert den.embed is not c.cond_embedding
    box: list[tuple[torch.Tensor, StreamState]] = []
    caller = threading.Thread(target=lambda: box.append(graphed.process_frame(frames[0], noise=noises[0])))
    caller.start()  # frame 0 from another thread, frame 1 from this one
    caller.join()
    (hq0, state), = box
    assert graphs() == 0 and marks == []  # the cold frame: nothing compiled, nothing graphed
    hq1, _ = graphed.process_frame(frames[1], state, noise=noises[1])
    assert graphs() == 4 and not counters["graph_break"]  # warm step (run 4 times), embedding, TPM, decoder
    for a, b in zip((hq0, hq1), ref):
        assert float((a - b).abs().max()) <= 1e-5
    assert len(marks) == 4 + 1 + 1 + 1  # the warm frame: 4 steps, TPM features, ARTG embedding, decoder
    assert set(marks) == {graphed.worker.thread_name}  # all on the pipeline's one thread
    assert graphed.worker.thread_name.startswith("vsstreamdiffvsr")
    announced = capfd.readouterr()
    assert announced.out == ""
    assert announced.err.count("compiling the denoising (reduce-overhead) for 32x32 input") == 1
    again = fresh.with_options(compile=True, tile=64, **aot)  # another view (a second upscale(), a reloaded script)
    assert again.denoiser.step_warm is graphed.denoiser.step_warm and again.worker is graphed.worker


def test_compiled_tiles_equal_eager_tiles(fresh: StreamDiffVSR, aot: dict[str, Path]) -> None:
    """compile_mode="default" (no CUDA graphs: frames run on the caller's thread) with cropped HR tiles: the eager
    frames, and one graph per compiled stage (the whole latent's step; the tiles' embedding, TPM, decoder)."""
    frames, noises = frames_and_noise(2, 32, 48)
    ref = run(fresh.with_options(tile=32), frames, noises)
    compiled = fresh.with_options(tile=32, compile=True, compile_mode="default", **aot)
    assert compiled.options.compiled and not compiled.options.uses_cuda_graphs and compiled.worker is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(aot["compile_cache_dir"])
    out = run(compiled, frames, noises)
    assert compiled.stats["tiled_frames"] == 2
    assert graphs() == 4 and not counters["graph_break"]
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-5


def test_compiled_decoder_output_is_not_carried_by_reference(pipe: StreamDiffVSR,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA-graph compiled decoder reuses its output buffer: the carried frame must be a copy (made where
    graphed calls are wrapped, so nothing downstream copies again)."""
    view = pipe.with_options()
    shared = torch.zeros(1, 3, 128, 128)

    def graph_like_decode(z: torch.Tensor, feats: object) -> torch.Tensor:
        shared.copy_(torch.rand(1, 3, 128, 128))
        return shared

    monkeypatch.setattr(view.denoiser, "decode_warm", own_outputs(graph_like_decode))  # as compiled() wraps it
    frames, noises = frames_and_noise(2, 32, 32)
    _, state = view.process_frame(frames[0], StreamState(), noise=noises[0])  # cold: the eager decoder
    _, state = view.process_frame(frames[1], state, noise=noises[1])          # warm: the "graphed" one
    assert state.prev_hq is not None and state.prev_hq.data_ptr() != shared.data_ptr()
    assert torch.equal(state.prev_hq, shared)


def test_each_compiled_denoising_function_traces_whole_in_float16(tiny_ckpt: Path) -> None:
    """compile=True compiles the warm step (ControlNet + U-Net), ARTG's embedding, the TPM encoder and the
    decoder, with fullgraph=False: a graph break (a diffusers update, a data-dependent branch of ours) would
    leave part of the denoising eager between CUDA graphs, silently and at a large cost. Each traces whole in
    the half precision CUDA defaults to (float32: test_compiled_equals_eager_in_a_cuda_graph_mode counts them)."""
    p = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float16")
    assert not p.options.compiled  # so these are the eager functions compile=True wraps
    den = p.denoiser
    frames, noise = frames_and_noise(1, 32, 32, seed=7)
    x = (frames[0] * 2 - 1).to(p.dtype)
    warped = torch.rand(1, 3, 128, 128) * 2 - 1
    t = torch.tensor(p.timesteps[0])
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            cond = den.embed(warped.to(p.dtype))
            feats = den.features(warped)
            for fn, args in ((den.step_warm, (noise[0], x, t, cond)), (den.embed, (warped.to(p.dtype),)),
                             (den.features, (warped,)), (den.decode_warm, (noise[0], feats))):
                explained = torch._dynamo.explain(fn)(*args)
                assert (explained.graph_count, explained.graph_break_count) == (1, 0), (fn, explained.break_reasons)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- the compiled RAFT

def test_compiled_flow_equals_eager_and_compiles_the_update_once(fresh: StreamDiffVSR, aot: dict[str, Path],
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """compile_flow: RAFT's parts through torch.compile give the eager flow. The 12 updates run one compiled graph
    12 times (a graph with them unrolled took most of a cold compile's time): four graphs in all (encoder, context,
    update, upsampling), one more update per correlation. Views share the compiled parts; each RAFT precision
    gets parts of its own; compile_flow=False turns it off."""
    frames, _ = frames_and_noise(3, 32, 32, seed=6)
    x0, x1, x2 = (f * 2 - 1 for f in frames)
    view = fresh.with_options(compile_flow=True, **aot)
    assert view.options.flow_compiled and not fresh.options.flow_compiled
    raft = fresh.components.raft(torch.float32)
    assert fresh.flow._entry(torch.float32) == raft.flow_and_features  # eager: RAFT's own entry
    assert view.flow._entry(torch.float32) != raft.flow_and_features
    with torch.inference_mode():
        full = view.flow.flow_and_features(x1, x0)[0]
        assert graphs() == 4 and not counters["graph_break"]  # each part one whole graph
        assert float((full - fresh.flow.flow_and_features(x1, x0)[0]).abs().max()) <= 1e-4
        view.flow.flow_and_features(x2, x1)  # another frame: no new graph
        assert graphs() == 4
        half = view.with_options(raft_corr="half").flow.flow_and_features(x2, x1)[0]  # the float16 pyramid's lookup
        assert graphs() == 5 and not counters["graph_break"]
        eager_half = fresh.with_options(raft_corr="half").flow.flow_and_features(x2, x1)[0]
        assert float((half - eager_half).abs().max()) <= 1e-4
    announced = capfd.readouterr()  # once per size and correlation, on stderr: a first compile takes a minute or more
    assert announced.out == ""
    assert announced.err.count("compiling the optical flow (full correlation, RAFT at HR) for 32x32 input") == 1
    assert announced.err.count("compiling the optical flow (half correlation, RAFT at HR) for 32x32 input") == 1
    again = view.with_options(tile=64)
    assert again.flow._entry(torch.float32) is view.flow._entry(torch.float32)  # shared, not compiled anew
    low = view.with_options(raft_dtype="bfloat16")  # compiled parts of its own, around the bfloat16 networks
    assert low.options.flow_compiled and low.flow._entry(torch.bfloat16) is not view.flow._entry(torch.float32)
    assert view.with_options(raft_dtype="bfloat16").flow._entry(torch.bfloat16) is low.flow._entry(torch.bfloat16)
    off = view.with_options(compile_flow=False)
    assert not off.options.flow_compiled and off.flow._entry(torch.float32) == raft.flow_and_features


def test_lean_correlation_flow_stays_eager_under_compile_flow(pipe: StreamDiffVSR, aot: dict[str, Path]) -> None:
    """The lean correlation's chunked lookups unroll into a large graph (on this CPU at a 256x320 input: 7 min
    with the 12 updates unrolled, 49 s for one update, more at 4K): with compile_flow it runs eagerly."""
    frames, _ = frames_and_noise(2, 32, 32, seed=6)
    x, xp = (f * 2 - 1 for f in frames)
    view = pipe.with_options(compile_flow=True, raft_corr="lean", **aot)
    with torch.inference_mode():
        flow = view.flow.flow_and_features(x, xp)[0]
        assert graphs() == 0
        assert torch.equal(flow, pipe.with_options(raft_corr="lean").flow.flow_and_features(x, xp)[0])


@pytest.mark.parametrize(("corr", "dtype"), [("lean", "float32"), ("half", "bfloat16")])
def test_each_raft_part_traces_whole(pipe: StreamDiffVSR, corr: str, dtype: str) -> None:
    """compile_flow compiles RAFT's parts (encoder, context, one update, upsampling): an unintended graph break
    (HalfCorrBlock's `assert tensor_list` once broke the 1080p flow into eager pieces) would leave part of
    RAFT uncompiled, silently. Also with RAFT's networks in half precision (raft_dtype). The full and half
    correlations in float32: test_compiled_flow_equals_eager_and_compiles_the_update_once counts their graphs."""
    frames, _ = frames_and_noise(2, 32, 32, seed=6)
    x, xp = (f * 2 - 1 for f in frames)
    a, b = F.interpolate(x, scale_factor=4, mode="bicubic"), F.interpolate(xp, scale_factor=4, mode="bicubic")
    raft = pipe.components.raft(torch.float32)
    if dtype != "float32":  # a copy of our own: the session's model keeps only the precisions it was asked for
        raft = raft.with_dtype(getattr(torch, dtype))
    parts, block = raft.parts, raft._blocks[corr]
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            fmap1, fmap2 = raft.encode(a), raft.encode(b)
            block.build_pyramid(fmap1, fmap2)
            hidden, context = parts.context(a)
            gy, gx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
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


# ---------------------------------------------------------------------------------------------- what None resolves to

def test_compile_none_is_on_for_cuda_only_where_triton_runs(pipe: StreamDiffVSR,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options_module, "_has_triton", lambda: True)
    assert Options(device="cuda").compiled and Options(device="cuda").uses_cuda_graphs
    assert not Options(device="cpu").compiled and not Options(device="cpu").uses_cuda_graphs
    monkeypatch.setattr(options_module, "_has_triton", lambda: False)  # PyPI's torch for Windows, an old GPU
    assert not Options(device="cuda").compiled and not Options(device="cuda").flow_compiled
    assert Options(device="cuda", compile=True).compiled  # asked for: check_compiler then says what is missing
    assert Options(device="cpu", compile=True).compiled
    assert pipe.options.compile is None and not pipe.options.compiled and pipe.worker is None  # loaded on the CPU


def test_compile_flow_follows_compile_on_cuda_only(tiny_ckpt: Path, aot: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_flow=None: RAFT is compiled with the denoising on CUDA; on the CPU only when asked for; an
    explicit False holds for views that compile later."""
    monkeypatch.setattr(options_module, "_has_triton", lambda: True)
    assert Options(device="cuda", compile=True).flow_compiled and Options(device="cuda").flow_compiled
    assert not Options(device="cuda", compile=False).flow_compiled
    assert not Options(device="cuda", compile=True, compile_flow=False).flow_compiled
    told_not = Options(device="cuda", compile_flow=False)
    assert not dataclasses.replace(told_not, compile=True).flow_compiled  # False holds
    assert not Options(device="cpu", compile=True).flow_compiled
    asked_for = Options(device="cpu", compile_flow=True)
    assert asked_for.flow_compiled and not asked_for.compiled
    loaded = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", compile=True, **aot)
    raft = loaded.components.raft(torch.float32)
    assert loaded.options.compiled and not loaded.options.flow_compiled
    assert loaded.flow._entry(torch.float32) == raft.flow_and_features  # CPU: RAFT stays eager
    asked = loaded.with_options(compile_flow=True)
    assert asked.options.flow_compiled and asked.flow._entry(torch.float32) != raft.flow_and_features


# ---------------------------------------------------------------------------------------------- the compile fallback

def _broken_compiler(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> None:
    """A torch.compile backend that fails as inductor does on a machine without a working Triton."""
    raise RuntimeError("Cannot find a working triton installation. Either the package is not installed or it "
                       "is too old.\nMore information may be found here.")


def test_a_failing_compiler_leaves_the_pipeline_eager_with_one_warning(fresh: StreamDiffVSR, ref32: tuple,
                                                                      aot: dict[str, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails on this machine (no Triton, no C++ compiler, a compiler bug) costs a warning
    and the compile's speed, not the clip: the denoising and the flow each warn once, naming the option that
    skips the attempt, and run eagerly, with the eager numbers, also in views made later."""
    frames, noises, ref = ref32
    monkeypatch.setattr(compiling, "BACKEND", _broken_compiler)
    broken = fresh.with_options(compile=True, compile_mode="default", compile_flow=True, **aot)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(broken, frames, noises)
        again = run(broken.with_options(prefetch_flow=False), frames, noises)  # a view: the same compiled sets
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 2, fallbacks
    assert any("for the denoising" in m and "compile=False skips" in m for m in fallbacks), fallbacks
    assert any("for the optical flow" in m and "compile_flow=False skips" in m for m in fallbacks), fallbacks
    assert all("Cannot find a working triton installation" in m for m in fallbacks)
    assert all("\n" not in m for m in fallbacks)  # one line each
    for a, b, c in zip(out, again, ref):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_compile_fallback_passes_on_what_is_not_a_compile_failure() -> None:
    """The model's own errors, and running out of memory while compiling (which the out-of-memory fallback
    handles by tiling), propagate: only a compiler's failure turns the functions eager."""
    from torch._dynamo.exc import InternalTorchDynamoError

    def oom_compiler(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory while autotuning")

    def runtime_failure(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        def fails(*args: object) -> None:
            raise ValueError("a bad input the eager code rejects too")
        return fails

    def eager(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    x = torch.ones(3)
    try:
        for backend, error in ((oom_compiler, torch.OutOfMemoryError), (runtime_failure, ValueError)):
            torch._dynamo.reset()
            fallback = CompileFallback("a test", "compile=False")
            call = fallback.wrap(torch.compile(eager, backend=backend), eager)
            with warnings.catch_warnings():
                warnings.simplefilter("error", CompileFallbackWarning)
                with pytest.raises(error):
                    call(x)
            assert not fallback.failed

        def wrapped_oom(x: torch.Tensor) -> torch.Tensor:  # an out-of-memory error dynamo hands on as the cause
            try:
                raise torch.OutOfMemoryError("CUDA out of memory (inside dynamo)")
            except torch.OutOfMemoryError as oom:
                raise InternalTorchDynamoError("wrapped") from oom

        fallback = CompileFallback("a test", "compile=False")
        with pytest.raises(torch.OutOfMemoryError, match="inside dynamo"):
            fallback.wrap(wrapped_oom, eager)(x)
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
    finally:
        torch._dynamo.reset()


def test_compile_on_cuda_without_triton_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyPI's torch for Windows has no Triton: compile=True says so when the pipeline is built, with the fix."""
    import torch.utils._triton as triton_util

    monkeypatch.setattr(triton_util, "has_triton", lambda: False)
    with pytest.raises(ValueError, match=r"needs Triton.*triton-windows.*compile=False"):
        check_compiler(torch.device("cuda"), "inductor")
    check_compiler(torch.device("cpu"), "inductor")  # inductor's CPU code needs no Triton
    check_compiler(torch.device("cuda"), "aot_eager")
    monkeypatch.setattr(triton_util, "has_triton", lambda: True)
    check_compiler(torch.device("cuda"), "inductor")


# ---------------------------------------------------------------------------------------------- the kernel cache

def test_compile_cache_makes_a_private_folder_even_under_umask_000(tmp_path: Path, cache_env: None) -> None:
    """Kernels read from the cache are code this process runs: the folder is the user's alone (0700)."""
    old = os.umask(0)
    try:
        root = compile_cache(tmp_path / "cache" / "inductor")
    finally:
        os.umask(old)
    assert root == tmp_path / "cache" / "inductor"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(root)
    assert os.environ["TRITON_CACHE_DIR"] == str(root / "triton")


def test_compile_cache_tightens_an_existing_folder_of_ours(tmp_path: Path, cache_env: None) -> None:
    """A folder made by an earlier version, or by hand under a lax umask, is made private."""
    root = tmp_path / "inductor"
    root.mkdir()
    root.chmod(0o777)
    assert compile_cache(root) == root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777], ids=["0777", "0770", "1777 (sticky, as /tmp)"])
def test_compile_cache_refuses_another_users_folder_that_others_can_write_to(
        pipe: StreamDiffVSR, tmp_path: Path, cache_env: None, monkeypatch: pytest.MonkeyPatch, mode: int) -> None:
    """Another user's folder that others may write to could hold planted kernels: refused with one line naming
    the option, left as it is, and not made the cache. (Tests run as root: ownership is simulated.)"""
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(mode)
    monkeypatch.setattr(os, "getuid", lambda: root.stat().st_uid + 1)
    with pytest.raises(ValueError, match="compile_cache_dir") as refused:
        compile_cache(root)
    assert "\n" not in str(refused.value) and "another user" in str(refused.value)
    with pytest.raises(ValueError, match="compile_cache_dir"):  # through the pipeline: the view is refused
        pipe.with_options(compile=True, compile_cache_dir=root)
    assert stat.S_IMODE(root.stat().st_mode) == mode
    assert all(name not in os.environ for name in _CACHE_VARS)


def test_compile_cache_uses_another_users_folder_that_only_they_can_write(
        tmp_path: Path, cache_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "theirs"
    root.mkdir()
    root.chmod(0o755)
    monkeypatch.setattr(os, "getuid", lambda: root.stat().st_uid + 1)
    assert compile_cache(root) == root
    assert stat.S_IMODE(root.stat().st_mode) == 0o755  # not ours to change


def test_compile_cache_tells_the_users_setting_from_torchs_default(tmp_path: Path) -> None:
    """torch writes its /tmp default into TORCHINDUCTOR_CACHE_DIR the first time dynamo is imported (our own
    imports do that); only a value the user set is theirs to keep."""
    code = (
        "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
        "from vsstreamdiffvsr.pipeline.compiling import compile_cache\n"
        "cache_dir()  # as torch does: its default into the environment, unless the user set one\n"
        "print(compile_cache())\n")
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARS}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(tmp_path / "cache" / "vsstreamdiffvsr" / "inductor")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.stdout.strip() == str(tmp_path / "mine"), res.stderr[-2000:]

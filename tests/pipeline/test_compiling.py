"""Speed levers keep the picture: half precision, channels_last, torch.compile and its fallback, CUDA graphs
and their worker thread, cuDNN/TF32 flags, the compile cache.

Timings are never asserted here (see scripts/bench.py); these tests check correctness on the CPU.
"""

from __future__ import annotations

import contextlib
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
from vsstreamdiffvsr.errors import CompileFallbackWarning, FlowGraphWarning

from .streams import frames_and_noise, psnr, run


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
    from torch._dynamo.exc import InternalTorchDynamoError

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


def test_half_precision_vae_close_to_float32(tiny_ckpt: Path, pipe: StreamDiffVSR) -> None:
    frames, noises = frames_and_noise(2, 32, 32)
    ref = run(pipe, frames, noises)
    fast = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", vae_dtype="bfloat16")
    assert next(fast.vae.parameters()).dtype == torch.bfloat16
    for a, b in zip(run(fast, frames, noises), ref):
        assert a.dtype == torch.float32 and 35.0 <= psnr(a, b) < 200.0


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
    assert view.compile_flow and not pipe.compile_flow
    assert view._raft_entry(torch.float32) != pipe._raft_entry(torch.float32) == pipe.raft.flow_and_features
    with torch.inference_mode():
        for prev, cur in zip(frames, frames[1:]):
            x, xp = cur * 2 - 1, prev * 2 - 1
            assert float((view.compute_flow(x, xp) - pipe.compute_flow(x, xp)).abs().max()) <= 1e-4
    announced = capfd.readouterr()  # once per size, on stderr: a first compile takes a minute or more
    message = "compiling the optical flow (full correlation, RAFT at HR) for 40x32"
    assert announced.out == "" and announced.err.count(message) == 1
    half = view.with_options(raft_corr="half")  # the float16 pyramid: its build eager inside the compiled flow
    with torch.inference_mode():
        x, xp = frames[1] * 2 - 1, frames[0] * 2 - 1
        assert float((half.compute_flow(x, xp) - pipe.with_options(raft_corr="half").compute_flow(x, xp))
                     .abs().max()) <= 1e-4
    low = view.with_options(raft_dtype="bfloat16")  # compiled parts of its own, around the bfloat16 networks
    assert low.compile_flow and low._raft_entry(torch.bfloat16) is not view._raft_entry(torch.float32)
    assert view.with_options(raft_dtype="bfloat16")._raft_entry(torch.bfloat16) is low._raft_entry(torch.bfloat16)
    with torch.inference_mode():
        eager_low = pipe.with_options(raft_dtype="bfloat16").compute_flow(x, xp)
        assert float((low.compute_flow(x, xp) - eager_low).abs().max()) <= 1e-3
    again = view.with_options(tile=64)
    assert again._raft_entry(torch.float32) is view._raft_entry(torch.float32)  # shared, not compiled anew
    off = view.with_options(compile_flow=False)
    assert off._raft_entry(torch.float32) == pipe.raft.flow_and_features and not off.compile_flow
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
    raft = pipe._raft_net(getattr(torch, dtype))
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

    view._raft_entry, view.compile_flow = (lambda dtype: compiled_raft), True
    with torch.inference_mode():
        for corr in ("full", "half", "lean"):
            view.raft_corr = corr
            view.compute_flow(x, xp)
    assert calls == ["full", "half"]


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

"""vsstreamdiffvsr.upscale through the Python API (in-process VapourSynth core)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import vapoursynth as vs

import vsstreamdiffvsr
from vsstreamdiffvsr import Options, StreamDiffVSR
from vsstreamdiffvsr.filter import node as vsfilter
from vsstreamdiffvsr.pipeline.flow import FlowStage

from ..vsclips import expected_run, make_source

core = vs.core


def out_tensor(clip: vs.VideoNode, n: int) -> torch.Tensor:
    f = clip.get_frame(n)
    return torch.stack([torch.from_numpy(np.array(f[p], dtype=np.float32)) for p in range(3)])[None]


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= tol, err


def test_in_order_equals_pipeline_and_odd_size_is_exact(tiny_ckpt: Path, pipe) -> None:
    src = make_source(34, 33, 5)  # not multiples of 4: padded inside, cropped back
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu")
    assert (out.width, out.height, out.num_frames, out.format.id) == (136, 132, 5, vs.RGBS)
    expected = expected_run(pipe, src, range(5))
    for n in range(5):
        assert_close(out_tensor(out, n), expected[n])


def test_out_of_order_requests_are_caught_up_exactly(tiny_ckpt: Path, pipe) -> None:
    src = make_source(32, 32, 8)
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", max_gap=8)
    expected = expected_run(pipe, src, range(8))
    order = list(range(8))
    random.Random(1).shuffle(order)
    got = {n: out_tensor(out, n) for n in order}
    for n in range(8):
        assert_close(got[n], expected[n])


def test_seeks_cold_start_and_warmup(tiny_ckpt: Path, pipe) -> None:
    src = make_source(32, 32, 40)
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", max_gap=4)
    run0 = expected_run(pipe, src, range(4))
    for n in (2, 0, 1, 3):
        assert_close(out_tensor(out, n), run0[n])
    # 30 is more than max_gap ahead: cold start at 30, then a new run from there
    run30 = expected_run(pipe, src, range(30, 33))
    assert_close(out_tensor(out, 30), run30[0])
    assert_close(out_tensor(out, 32), run30[2])
    assert_close(out_tensor(out, 31), run30[1])
    # backward jump: cold start at 10
    run10 = expected_run(pipe, src, range(10, 12))
    assert_close(out_tensor(out, 10), run10[0])
    assert_close(out_tensor(out, 11), run10[1])
    # the cold start differs from the uninterrupted run (the seek is visible, by design)
    full = expected_run(pipe, src, range(0, 11))
    assert float((full[10] - run10[0]).abs().max()) > 1e-3

    warm = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", max_gap=2, warmup=3)
    warm.get_frame(0)
    run = expected_run(pipe, src, range(17, 21))
    assert_close(out_tensor(warm, 20), run[3])


def test_scene_change_starts_a_new_run(tiny_ckpt: Path, pipe) -> None:
    src = make_source(32, 32, 6, cuts={3})
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu")
    before, after = expected_run(pipe, src, range(0, 3)), expected_run(pipe, src, range(3, 6))
    got = [out_tensor(out, n) for n in range(6)]
    for n in range(3):
        assert_close(got[n], before[n])
    for n in range(3, 6):
        assert_close(got[n], after[n - 3])
    no_reset = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", reset_on_scene_change=False)
    assert_close(out_tensor(no_reset, 4), expected_run(pipe, src, range(0, 5))[4])


def test_each_frame_carries_its_own_props(tiny_ckpt: Path) -> None:
    src = make_source(32, 32, 8, cuts={2})
    src = core.std.SetFrameProp(src, prop="Custom", data="x")
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu")
    for n in (6, 1, 3, 0, 7, 2):  # 6 first: frames 0..5 are produced early, by frame 6's request
        props = out.get_frame(n).props
        assert props["SrcIndex"] == n
        assert props["_SceneChangePrev"] == int(n == 2)
        assert props["Custom"] == b"x" or props["Custom"] == "x"


def test_rgbh_in_rgbh_out(tiny_ckpt: Path, pipe) -> None:
    src = make_source(32, 36, 3, fmt=vs.RGBH)
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu")
    assert out.format.id == vs.RGBH and (out.width, out.height) == (128, 144)
    expected = expected_run(pipe, src, range(3))
    for n in range(3):
        assert_close(out_tensor(out, n), expected[n], tol=1e-3)  # float16 output rounding


def test_one_model_load_shared_by_calls(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real = StreamDiffVSR.from_pretrained.__func__

    def counting(cls, *a, **k):
        loads.append(1)
        return real(cls, *a, **k)

    monkeypatch.setattr(vsfilter, "_PIPES", {})
    monkeypatch.setattr(StreamDiffVSR, "from_pretrained", classmethod(counting))
    a = vsstreamdiffvsr.upscale(make_source(32, 32, 2), model_dir=tiny_ckpt, device="cpu")
    b = vsstreamdiffvsr.upscale(make_source(40, 32, 2), model_dir=tiny_ckpt, device="cpu:0", seed=3)
    c = vsstreamdiffvsr.upscale(make_source(40, 32, 2), model_dir=tiny_ckpt, options=Options(device="cpu:1"))
    a.get_frame(1), b.get_frame(1), c.get_frame(0)
    assert len(loads) == 1  # "cpu", "cpu:0" and "cpu:1" are one CPU


def test_seed_changes_the_noise(tiny_ckpt: Path) -> None:
    src = make_source(32, 32, 1)
    a = out_tensor(vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", seed=0), 0)
    b = out_tensor(vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", seed=1), 0)
    c = out_tensor(vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", seed=0), 0)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_nothing_reaches_stdout(tiny_ckpt: Path, capfd: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(vsfilter, "_PIPES", {})  # include the model load
    out = vsstreamdiffvsr.upscale(make_source(32, 32, 3), model_dir=tiny_ckpt, device="cpu")
    for n in (2, 0, 1):
        out.get_frame(n)
    captured = capfd.readouterr()
    assert captured.out == ""


def _rgbs(w: int = 64, h: int = 64, **kw) -> vs.VideoNode:
    return core.std.BlankClip(format=vs.RGBS, width=w, height=h, **kw)


@pytest.mark.parametrize(
    ("make", "kwargs", "needles"),
    [
        (lambda: core.std.BlankClip(format=vs.YUV420P8, width=64, height=64), {},
         ["RGBS", "core.resize.Bicubic(clip, format=vs.RGBS, matrix_in_s=\"709\")", "_Matrix"]),
        (lambda: core.std.BlankClip(format=vs.RGB24, width=64, height=64), {}, ["RGB24", "RGBS"]),
        (lambda: core.std.BlankClip(format=vs.GRAYS, width=64, height=64), {}, ["GrayS", "RGB"]),
        (lambda: core.std.Splice([_rgbs(length=1), core.std.BlankClip(format=vs.RGBH, width=64, height=64,
                                                                       length=1)], mismatch=True),
         {}, ["constant format"]),
        (lambda: core.std.Splice([_rgbs(length=1), _rgbs(48, 64, length=1)], mismatch=True),
         {}, ["constant frame size"]),
        (lambda: _rgbs(31, 64), {}, ["32 to 4096 px", "31x64"]),
        (lambda: _rgbs(64, 20), {}, ["32 to 4096 px"]),
        (lambda: _rgbs(100000, 32, length=1), {}, ["32 to 4096 px", "100000x32", "resize or crop"]),
        (lambda: _rgbs(32, 100000, length=1), {}, ["32 to 4096 px", "32x100000"]),
        (lambda: "not a clip", {}, ["vs.VideoNode"]),
        (lambda: _rgbs(), {"max_gap": 0}, ["max_gap"]),
        (lambda: _rgbs(), {"warmup": -1}, ["warmup"]),
        (lambda: _rgbs(), {"seed": 1.5}, ["seed"]),
        (lambda: _rgbs(), {"device": "cuda"}, ["CUDA", "-a device=cpu"]),
        (lambda: _rgbs(), {"device": 7}, ["device"]),
        (lambda: _rgbs(), {"dtype": "int8"}, ["dtype"]),
        (lambda: _rgbs(), {"compile": "0"}, ["compile must be None, True or False", "'0'"]),
        (lambda: _rgbs(), {"tile": 20}, ["tile sides must be multiples of 8"]),
        (lambda: _rgbs(), {"reset_on_scene_change": 1}, ["reset_on_scene_change must be True or False"]),
        (lambda: _rgbs(), {"options": {"flow": "lr"}}, ["options must be a vsstreamdiffvsr.Options"]),
        (lambda: _rgbs(), {"options": Options(device="cpu", flow="lr")}, ['flow="lr" needs a clip of at least']),
        (lambda: _rgbs(), {"options": Options(device="cpu", tile=32, tile_overlap=16), "tile": 64},
         []),  # the keyword wins over the options' tile: valid together
        (lambda: _rgbs().std.SetFieldBased(2), {}, ["interlaced (_FieldBased=2)", "SetFieldBased(clip, 0)"]),
    ],
)
def test_bad_input_gets_a_clear_error(make, kwargs, needles, tiny_ckpt: Path) -> None:
    if not needles:
        vsstreamdiffvsr.upscale(make(), **{"model_dir": tiny_ckpt, "device": "cpu", **kwargs})
        return
    with pytest.raises(vs.Error) as info:
        vsstreamdiffvsr.upscale(make(), **{"model_dir": tiny_ckpt, "device": "cpu", **kwargs})
    msg = str(info.value)
    assert msg.startswith("upscale: ")
    for needle in needles:
        assert needle in msg, msg
    assert "Traceback" not in msg and "\n" not in msg


def test_upscale_takes_about_ten_keywords() -> None:
    import inspect

    names = list(inspect.signature(vsstreamdiffvsr.upscale).parameters)
    assert names[0] == "clip" and names[-1] == "options" and len(names) <= 11


def test_options_reach_the_pipeline_and_keywords_win(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Options] = []
    real = vsfilter.get_pipeline

    def spy(model_dir, options):  # noqa: ANN001
        seen.append(options)
        return real(model_dir, options)

    monkeypatch.setattr(vsfilter, "get_pipeline", spy)
    vsstreamdiffvsr.upscale(_rgbs(), model_dir=tiny_ckpt, device="cpu", tile=64,
                            options=Options(tile=32, tile_overlap=8, raft_corr="lean", compile=False))
    assert seen[0].tile == (64, 64) and seen[0].tile_overlap == 8 and seen[0].raft_corr == "lean"
    assert seen[0].device == torch.device("cpu")


def test_max_gap_follows_the_core_threads(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    real = vsfilter._Filter.__init__

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        made.append(k["max_gap"])
        real(self, *a, **k)

    monkeypatch.setattr(vsfilter._Filter, "__init__", spy)
    threads = core.num_threads
    try:
        for n in (2, 24):
            core.num_threads = n
            vsstreamdiffvsr.upscale(_rgbs(), model_dir=tiny_ckpt, device="cpu")
    finally:
        core.num_threads = threads
    vsstreamdiffvsr.upscale(_rgbs(), model_dir=tiny_ckpt, device="cpu", max_gap=3)
    assert made == [16, 48, 3]


def test_a_bad_source_frame_fails_only_its_own_output(tiny_ckpt: Path, pipe) -> None:
    """Source frame 3 always raises: output 3 fails with one line naming upscale and the frame; 2 is exact
    (its look at frame 3 ahead fails quietly); 4.. start a new run at 4, with a warning."""
    src = make_source(32, 32, 8)

    def corrupt(n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        if n == 3:
            raise vs.Error("corrupt packet in source frame 3")
        return f

    broken = src.std.ModifyFrame(src, corrupt)
    out = vsstreamdiffvsr.upscale(broken, model_dir=tiny_ckpt, device="cpu")
    run0, run4 = expected_run(pipe, src, range(0, 3)), expected_run(pipe, src, range(4, 8))
    for n in range(3):
        assert_close(out_tensor(out, n), run0[n])
    with pytest.raises(vs.Error) as info:
        out.get_frame(3)
    # VapourSynth puts a Python filter's traceback before its message: the message is the last line
    last = str(info.value).strip().splitlines()[-1]
    assert last == "vapoursynth.Error: upscale: frame 3: source frame 3 failed: corrupt packet in source frame 3"
    with pytest.warns(RuntimeWarning, match="frame 3 failed"):
        got = out_tensor(out, 5)  # caught up past 3: the run restarts at 4
    assert_close(got, run4[1])
    for n in (4, 6, 7):
        assert_close(out_tensor(out, n), run4[n - 4])


def test_missing_weights_error_names_the_file_and_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vsfilter, "_PIPES", {})
    clip = core.std.BlankClip(format=vs.RGBS, width=64, height=64)
    with pytest.raises(vs.Error) as info:
        vsstreamdiffvsr.upscale(clip, model_dir=tmp_path / "nowhere", device="cpu")
    assert "nowhere" in str(info.value) and "python -m vsstreamdiffvsr download" in str(info.value)
    assert "\n" not in str(info.value)


def test_raft_dtype_reaches_the_flow_ahead_and_in_line(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options(raft_dtype=) runs RAFT's networks in that precision, for the flow computed ahead as for the one
    computed in line, with the same frames either way. (One warm frame each: half precision is slow on a CPU.)"""
    from vsstreamdiffvsr.models.flow import RaftFlow

    used: list[tuple[bool, torch.dtype]] = []
    real = RaftFlow.flow_and_features

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        used.append((torch.cuda.current_stream is None, self.compute_dtype))
        return real(self, *a, **k)

    monkeypatch.setattr(RaftFlow, "flow_and_features", spy)
    src = make_source(32, 32, 2)
    got = []
    for prefetch in (True, False):
        clip = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu",
                                       options=Options(raft_dtype="bfloat16", prefetch_flow=prefetch))
        got.append(out_tensor(clip, 1))
    assert [dt for _, dt in used] == [torch.bfloat16, torch.bfloat16]
    assert torch.equal(got[0], got[1])


def test_flow_prefetch_is_used_and_changes_nothing(tiny_ckpt: Path, pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"prefetch": 0, "flow": 0}
    real_prefetch = StreamDiffVSR.prefetch_flow
    real_flow = FlowStage.compute  # every flow, ahead or in line

    def counting_prefetch(self, *a, **k):
        calls["prefetch"] += 1
        return real_prefetch(self, *a, **k)

    def counting_flow(self, *a, **k):
        calls["flow"] += 1
        return real_flow(self, *a, **k)

    monkeypatch.setattr(StreamDiffVSR, "prefetch_flow", counting_prefetch)
    monkeypatch.setattr(FlowStage, "compute", counting_flow)
    reused: list[bool] = []
    real_features = FlowStage.flow_and_features

    def spying_flow(self, x, x_prev, mode=None, corr=None, previous_features=None, eager=False):  # noqa: ANN001
        reused.append(previous_features is not None)  # RAFT features kept from the previous frame's flow
        return real_features(self, x, x_prev, mode, corr, previous_features, eager)

    monkeypatch.setattr(FlowStage, "flow_and_features", spying_flow)
    src = make_source(32, 32, 6, cuts={4})
    with_prefetch = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu")
    got = [out_tensor(with_prefetch, n) for n in (0, 1, 2, 3, 4, 5)]
    # frames 1, 2, 3 and 5 are warm: each flow computed once, ahead; none ahead of the cut at 4
    assert calls == {"prefetch": 4, "flow": 4}
    # frames 2 and 3 reuse RAFT's features of frames 1 and 2; 1 and 5 follow a cold frame, which had no flow
    assert reused == [False, True, True, False]
    calls.update(prefetch=0, flow=0)
    without = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", options=Options(prefetch_flow=False))
    for n in range(6):
        assert torch.equal(out_tensor(without, n), got[n])
    assert calls == {"prefetch": 0, "flow": 4}


def test_compile_graph_mode_runs_frames_on_one_thread(tiny_ckpt: Path, pipe, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True (CUDA-graph mode by default): callbacks on VapourSynth's threads all hand their frames
    to the pipeline's one worker thread, with the same output (aot_eager stands in for inductor on CPU)."""
    import vsstreamdiffvsr.pipeline.denoise as denoise

    real_compiled = denoise.compiled
    real_frame = StreamDiffVSR._frame
    threads: set[str] = set()

    def aot_eager(fns, **k):  # noqa: ANN001, ANN003
        return real_compiled(fns, **{**k, "backend": "aot_eager"})

    def spy(self, *a, **k):
        threads.add(threading.current_thread().name)
        return real_frame(self, *a, **k)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(denoise, "compiled", aot_eager)
    monkeypatch.setattr(StreamDiffVSR, "_frame", spy)
    src = make_source(32, 32, 4)
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", compile=True)
    expected = expected_run(pipe, src, range(4))
    threads.clear()
    for n in range(4):
        assert_close(out_tensor(out, n), expected[n], tol=1e-5)
    assert len(threads) == 1 and threads.pop().startswith("vsstreamdiffvsr")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_the_source_is_a_clear_error(tiny_ckpt: Path, bad: float) -> None:
    """Infinities too: the [0, 1] clamp must not turn them silently into white or black."""
    src = make_source(32, 32, 3)

    def poison(n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        out = f.copy()
        if n == 1:
            np.asarray(out[0])[0, 0] = bad
        return out

    out = vsstreamdiffvsr.upscale(src.std.ModifyFrame(src, poison), model_dir=tiny_ckpt, device="cpu")
    out.get_frame(0)  # frame 1 is looked at ahead (its flow) here: frame 0 must not report it
    with pytest.raises(vs.Error, match="upscale: frame 1: source frame 1 contains NaN or infinite values"):
        out.get_frame(1)
    with pytest.warns(RuntimeWarning, match="frame 1 failed"):
        out.get_frame(2)  # its own frame is fine: a new run


def test_a_failure_inside_the_model_is_one_plain_line(tiny_ckpt: Path, pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of GPU memory, a CUDA error...: vs.Error naming the frame and the error, not a torch traceback."""
    src = make_source(32, 32, 2)
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", seed=5)
    def broken(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail")

    monkeypatch.setattr(StreamDiffVSR, "process_frame", broken)
    with pytest.raises(vs.Error) as info:
        out.get_frame(0)
    assert "upscale: frame 0: OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB" in str(info.value)
    assert "more detail" not in str(info.value)


def test_alpha_prop_is_not_carried_to_the_4x_frame(tiny_ckpt: Path) -> None:
    src = make_source(32, 32, 1)
    alpha = core.std.BlankClip(src, format=vs.GRAYS, length=1)
    out = vsstreamdiffvsr.upscale(core.std.ClipToProp(src, alpha, prop="_Alpha"), model_dir=tiny_ckpt,
                                  device="cpu")
    assert "_Alpha" not in out.get_frame(0).props

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
from vsstreamdiffvsr import filter as vsfilter

from .vsclips import expected_run, make_source

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


@pytest.mark.parametrize("whole_rows", [None, True])
@pytest.mark.parametrize("fmt", [vs.RGBS, vs.RGBH])
def test_output_planes_are_written_in_place_with_padded_rows(fmt: vs.PresetVideoFormat,
                                                             whole_rows: bool | None) -> None:
    """The output is copied from the (cropped) tensor straight into the frame's planes, whose rows VapourSynth
    pads to its alignment (132 samples here): every sample lands where it belongs, rounded to the format, both
    by the strided copy (the CPU's) and by the whole-row copy (a GPU's, forced here)."""
    blank = vs.core.std.BlankClip(format=fmt, width=132, height=20, length=1).get_frame(0)
    assert np.asarray(blank[0]).strides[0] > 132 * blank.format.bytes_per_sample  # the case under test
    hq = torch.rand(1, 3, 24, 136)
    out = vsfilter._tensor_to_frame(hq[..., :20, :132], blank, {"_Alpha": 1, "Mine": 7}, whole_rows=whole_rows)
    dtype = np.float16 if fmt == vs.RGBH else np.float32
    for p in range(3):
        assert np.array_equal(np.asarray(out[p]), hq[0, p, :20, :132].numpy().astype(dtype))
    assert np.asarray(blank[0]).max() == 0  # the template is left as it was
    assert out.props["Mine"] == 7 and "_Alpha" not in out.props


def test_rgbh_in_rgbh_out(tiny_ckpt: Path, pipe) -> None:
    src = make_source(32, 36, 3, fmt=vs.RGBH)
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu")
    assert out.format.id == vs.RGBH and (out.width, out.height) == (128, 144)
    expected = expected_run(pipe, src, range(3))
    for n in range(3):
        assert_close(out_tensor(out, n), expected[n], tol=1e-3)  # float16 output rounding


def test_one_model_load_shared_by_calls(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real = vsstreamdiffvsr.StreamDiffVSR.from_pretrained.__func__

    def counting(cls, *a, **k):
        loads.append(1)
        return real(cls, *a, **k)

    monkeypatch.setattr(vsfilter, "_PIPES", {})
    monkeypatch.setattr(vsstreamdiffvsr.StreamDiffVSR, "from_pretrained", classmethod(counting))
    a = vsstreamdiffvsr.upscale(make_source(32, 32, 2), model_dir=tiny_ckpt, device="cpu")
    b = vsstreamdiffvsr.upscale(make_source(40, 32, 2), model_dir=tiny_ckpt, device="cpu", seed=3)
    a.get_frame(1), b.get_frame(1)
    assert len(loads) == 1


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


@pytest.mark.parametrize(
    ("make", "kwargs", "needles"),
    [
        (lambda: core.std.BlankClip(format=vs.YUV420P8, width=64, height=64), {},
         ["RGBS", "core.resize.Bicubic(clip, format=vs.RGBS, matrix_in_s=\"709\")", "_Matrix"]),
        (lambda: core.std.BlankClip(format=vs.RGB24, width=64, height=64), {}, ["RGB24", "RGBS"]),
        (lambda: core.std.BlankClip(format=vs.GRAYS, width=64, height=64), {}, ["GrayS", "RGB"]),
        (lambda: core.std.Splice([core.std.BlankClip(format=vs.RGBS, width=64, height=64, length=1),
                                  core.std.BlankClip(format=vs.RGBH, width=64, height=64, length=1)], mismatch=True),
         {}, ["constant format"]),
        (lambda: core.std.Splice([core.std.BlankClip(format=vs.RGBS, width=64, height=64, length=1),
                                  core.std.BlankClip(format=vs.RGBS, width=48, height=64, length=1)], mismatch=True),
         {}, ["constant frame size"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=31, height=64), {}, ["at least 32x32", "31x64"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=20), {}, ["at least 32x32"]),
        (lambda: "not a clip", {}, ["vs.VideoNode"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"max_gap": 0}, ["max_gap"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"warmup": -1}, ["warmup"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"seed": 1.5}, ["seed"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"device": "cuda"}, ["CUDA"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"device": "cpu", "dtype": "int8"},
         ["dtype"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"raft_corr": "huge"},
         ["raft_corr", "'huge'", "'half'"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"raft_dtype": "float64"},
         ["raft_dtype must be None (auto), float32, float16 or bfloat16", "'float64'"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"compile_mode": "fast"},
         ["compile_mode", "'fast'", "'reduce-overhead'"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"graph_flow": True},
         ["graph_flow=True needs a CUDA device", "None"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"tile_denoise": "no"},
         ["tile_denoise must be True or False", "'no'"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"compile": "0"},
         ["compile must be True or False", "'0'"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"prefetch_flow": "no"},
         ["prefetch_flow must be True or False"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"graph_flow": 1},
         ["graph_flow must be None, True or False"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"compile_flow": "0"},
         ["compile_flow must be None, True or False", "'0'"]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"tile_denoise": True},
         ["tile_denoise=True needs a tile size", "tile="]),
        (lambda: core.std.BlankClip(format=vs.RGBS, width=64, height=64), {"tile": 32, "tile_overlap": 24},
         ["tile_overlap (24) must be at most half", "32"]),
    ],
)
def test_bad_input_gets_a_clear_error(make, kwargs, needles, tiny_ckpt: Path) -> None:
    with pytest.raises(vs.Error) as info:
        vsstreamdiffvsr.upscale(make(), **{"model_dir": tiny_ckpt, "device": "cpu", **kwargs})
    msg = str(info.value)
    assert msg.startswith("upscale: ")
    for needle in needles:
        assert needle in msg, msg
    assert "Traceback" not in msg


def test_missing_weights_error_names_the_file_and_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vsfilter, "_PIPES", {})
    clip = core.std.BlankClip(format=vs.RGBS, width=64, height=64)
    with pytest.raises(vs.Error) as info:
        vsstreamdiffvsr.upscale(clip, model_dir=tmp_path / "nowhere", device="cpu")
    assert "nowhere" in str(info.value) and "python -m vsstreamdiffvsr download" in str(info.value)
    assert "\n" not in str(info.value)


def test_raft_dtype_reaches_the_flow_ahead_and_in_line(tiny_ckpt: Path, pipe) -> None:
    """upscale(raft_dtype=) runs RAFT's networks in that precision, for the flow computed ahead as for the one
    computed in line: the frames of the pipeline's view with that option, with or without prefetch."""
    src = make_source(32, 32, 4)
    view = pipe.with_options(raft_dtype="bfloat16")
    want = expected_run(view, src, range(4))
    for prefetch in (True, False):
        clip = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", raft_dtype="bfloat16",
                                       prefetch_flow=prefetch)
        for n in range(4):
            assert float((out_tensor(clip, n) - want[n]).abs().max()) <= 1e-6
    f32 = expected_run(pipe, src, range(4))
    assert float((want[3] - f32[3]).abs().max()) > 1e-5  # the option changes the flow, hence the frames


def test_flow_prefetch_is_used_and_changes_nothing(tiny_ckpt: Path, pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"prefetch": 0, "flow": 0}
    real_prefetch = vsstreamdiffvsr.StreamDiffVSR.prefetch_flow
    real_flow = vsstreamdiffvsr.StreamDiffVSR._flow_features_with_fallbacks  # every flow, ahead or in line

    def counting_prefetch(self, *a, **k):
        calls["prefetch"] += 1
        return real_prefetch(self, *a, **k)

    def counting_flow(self, *a, **k):
        calls["flow"] += 1
        return real_flow(self, *a, **k)

    monkeypatch.setattr(vsstreamdiffvsr.StreamDiffVSR, "prefetch_flow", counting_prefetch)
    monkeypatch.setattr(vsstreamdiffvsr.StreamDiffVSR, "_flow_features_with_fallbacks", counting_flow)
    reused: list[bool] = []
    real_features = vsstreamdiffvsr.StreamDiffVSR._flow_and_features

    def spying_flow(self, x, x_prev, mode=None, corr=None, previous_features=None):  # noqa: ANN001
        reused.append(previous_features is not None)  # RAFT features kept from the previous frame's flow
        return real_features(self, x, x_prev, mode, corr, previous_features)

    monkeypatch.setattr(vsstreamdiffvsr.StreamDiffVSR, "_flow_and_features", spying_flow)
    src = make_source(32, 32, 6, cuts={4})
    with_prefetch = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu")
    got = [out_tensor(with_prefetch, n) for n in (0, 1, 2, 3, 4, 5)]
    # frames 1, 2, 3 and 5 are warm: each flow computed once, ahead; none ahead of the cut at 4
    assert calls == {"prefetch": 4, "flow": 4}
    # frames 2 and 3 reuse RAFT's features of frames 1 and 2; 1 and 5 follow a cold frame, which had no flow
    assert reused == [False, True, True, False]
    calls.update(prefetch=0, flow=0)
    without = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", prefetch_flow=False)
    for n in range(6):
        assert torch.equal(out_tensor(without, n), got[n])
    assert calls == {"prefetch": 0, "flow": 4}


def test_compile_graph_mode_runs_frames_on_one_thread(tiny_ckpt: Path, pipe, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True (CUDA-graph mode by default): callbacks on VapourSynth's threads all hand their frames
    to the pipeline's one worker thread, with the same output (aot_eager stands in for inductor on CPU)."""
    real_compile = vsstreamdiffvsr.StreamDiffVSR.enable_compile
    real_frame = vsstreamdiffvsr.StreamDiffVSR._frame
    threads: set[str] = set()

    def aot_eager(self, mode="reduce-overhead", cache_dir=None, backend="inductor"):
        return real_compile(self, mode, cache_dir, "aot_eager")

    def spy(self, *a, **k):
        threads.add(threading.current_thread().name)
        return real_frame(self, *a, **k)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(vsstreamdiffvsr.StreamDiffVSR, "enable_compile", aot_eager)
    monkeypatch.setattr(vsstreamdiffvsr.StreamDiffVSR, "_frame", spy)
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
    with pytest.raises(vs.Error, match="source frame 1 contains NaN or infinite values"):
        out.get_frame(2)  # caught up through the bad frame 1


def test_a_failure_inside_the_model_is_one_plain_line(tiny_ckpt: Path, pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of GPU memory, a CUDA error...: vs.Error naming the frame and the error, not a torch traceback."""
    src = make_source(32, 32, 2)
    out = vsstreamdiffvsr.upscale(src, model_dir=tiny_ckpt, device="cpu", seed=5)
    shared = vsfilter.get_pipeline(tiny_ckpt, torch.device("cpu"), torch.float32)

    def broken(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail")

    monkeypatch.setattr(type(shared), "process_frame", broken)
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


def test_stdout_redirect_of_two_nodes_on_two_threads() -> None:
    """Enter A, enter B, leave A, leave B (two upscale() callbacks overlapping): stdout goes to stderr while
    either runs and comes back to itself after both."""
    import sys

    original = sys.stdout
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def node_a() -> None:
        with vsfilter._python_stdout_to_stderr():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def node_b() -> None:
        a_in.wait(5)
        with vsfilter._python_stdout_to_stderr():
            b_in.set()
            a_out.wait(5)
            seen.append(sys.stdout is sys.stderr)

    threads = [threading.Thread(target=node_a), threading.Thread(target=node_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [True] and sys.stdout is original

"""StreamDiffVSR.process_frame (and process_batch) on a tiny random checkpoint (CPU, float32, LR 32x36)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vsstreamdiffvsr import StreamDiffVSR, StreamState
from vsstreamdiffvsr.models.flow import warp

H, W = 32, 36


def _frames(n: int, h: int = H, w: int = W, seed: int = 0) -> list[torch.Tensor]:
    """A smooth random texture panning right by 1 px per frame, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    big = torch.rand(1, 3, h // 4 + 2, (w + n) // 4 + 3, generator=g)
    big = F.interpolate(big, size=(h, w + n + 4), mode="bilinear", align_corners=False).clamp(0, 1)
    return [big[..., :, n - i: n - i + w].contiguous() for i in range(n)]


def _noises(n: int, h: int = H, w: int = W, seed: int = 100) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, h, w, generator=g) for _ in range(n)]


class _Counter:
    def __init__(self, fn):  # noqa: ANN001
        self.fn = fn
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> dict[str, _Counter]:
    c, raft = pipe.components, pipe.components.raft(torch.float32)
    out = {
        "controlnet": _Counter(c.controlnet.forward),
        "cond_embedding": _Counter(pipe.denoiser.embed),
        "temporal_features": _Counter(pipe.denoiser.features),
        "raft": _Counter(raft.flow_and_features),
        "unet": _Counter(c.unet.forward),
    }
    monkeypatch.setattr(c.controlnet, "forward", out["controlnet"])
    monkeypatch.setattr(pipe.denoiser, "embed", out["cond_embedding"])  # the stage's (eager or compiled) entry
    monkeypatch.setattr(pipe.denoiser, "features", out["temporal_features"])
    monkeypatch.setattr(raft, "flow_and_features", out["raft"])  # RAFT's eager entry point
    monkeypatch.setattr(c.unet, "forward", out["unet"])
    return out


def test_cold_then_warm_paths(pipe: StreamDiffVSR, spies: dict[str, _Counter]) -> None:
    f0, f1 = _frames(2)
    n0, n1 = _noises(2)
    hq0, s0 = pipe.process_frame(f0, noise=n0)
    assert len(spies["controlnet"].calls) == 0
    assert len(spies["temporal_features"].calls) == 0
    assert len(spies["raft"].calls) == 0
    assert len(spies["unet"].calls) == 4
    assert s0.frame_count == 1 and not s0.is_cold

    hq1, s1 = pipe.process_frame(f1, s0, noise=n1)
    assert len(spies["controlnet"].calls) == 4  # ARTG at every one of the 4 steps
    assert len(spies["cond_embedding"].calls) == 1  # its conditioning embedding once: the same for all 4
    assert len(spies["temporal_features"].calls) == 1  # TPM features once per frame
    assert len(spies["raft"].calls) == 1
    assert len(spies["unet"].calls) == 8
    assert s1.frame_count == 2

    # Flow current -> previous, on the bicubic x4 of the [-1, 1] LR frames (independently computed).
    (cur, prev), _ = spies["raft"].calls[0]
    exp_cur = F.interpolate(f1 * 2 - 1, scale_factor=4, mode="bicubic", align_corners=False)
    exp_prev = F.interpolate(f0 * 2 - 1, scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(cur, exp_cur, atol=1e-6, rtol=0)
    torch.testing.assert_close(prev, exp_prev, atol=1e-6, rtol=0)

    # ARTG conditioning and TPM input are the previous raw output warped by that flow.
    with torch.no_grad():
        flow = pipe.components.raft(torch.float32)(exp_cur, exp_prev)
        warped = warp(s0.prev_hq, flow)
    torch.testing.assert_close(spies["cond_embedding"].calls[0][0][0], warped, atol=1e-5, rtol=0)
    with torch.no_grad():
        embedded = pipe.components.cond_embedding(warped)
    for _args, kwargs in spies["controlnet"].calls:
        torch.testing.assert_close(kwargs["controlnet_cond"], embedded, atol=1e-5, rtol=0)
    torch.testing.assert_close(spies["temporal_features"].calls[0][0][0], warped, atol=1e-5, rtol=0)

    # The warm path changes the result compared with a cold frame 1 with the same noise.
    hq1_cold, s1_cold = pipe.process_frame(f1, noise=n1)
    assert s1_cold.frame_count == 1
    assert float((hq1 - hq1_cold).abs().max()) > 1e-4


def test_empty_state_is_cold_start(pipe: StreamDiffVSR) -> None:
    f0 = _frames(1)[0]
    n0 = _noises(1)[0]
    a, _ = pipe.process_frame(f0, None, noise=n0)
    b, _ = pipe.process_frame(f0, StreamState(), noise=n0)
    assert torch.equal(a, b)


def test_output_format_and_raw_state(pipe: StreamDiffVSR) -> None:
    raw: list[torch.Tensor] = []
    # Capture what the decoder returns, and scale its last conv so the raw output leaves [-1, 1].
    last = pipe.components.vae.decoder.layers[-1]
    saved = (last.weight.detach().clone(), last.bias.detach().clone())
    handle = pipe.components.vae.decoder.register_forward_hook(lambda mod, args, out: raw.append(out))
    try:
        with torch.no_grad():
            last.weight.mul_(3.0)
            last.bias.mul_(3.0)
        f0, f1 = _frames(2)
        n0, n1 = _noises(2)
        state = StreamState()
        for i, (f, n) in enumerate(((f0, n0), (f1, n1))):
            hq, state = pipe.process_frame(f, state, noise=n)
            assert hq.shape == (1, 3, 4 * H, 4 * W)
            assert hq.dtype == torch.float32
            assert float(hq.min()) >= 0.0 and float(hq.max()) <= 1.0
            assert state.frame_count == i + 1
            # The carried tensor is the raw (unclamped) decoder output.
            assert len(raw) == i + 1
            assert torch.equal(state.prev_hq, raw[-1].float())
            assert float(state.prev_hq.max()) > 1.0 or float(state.prev_hq.min()) < -1.0
            torch.testing.assert_close(hq, torch.clamp(state.prev_hq / 2 + 0.5, 0, 1), atol=0, rtol=0)
            assert float(((hq == 0) | (hq == 1)).float().mean()) > 0  # clamping really happened in hq
            # prev_lq is the LR input in [0, 1].
            torch.testing.assert_close(state.prev_lq, f, atol=0, rtol=0)
            assert state.prev_lq.dtype == torch.float32
    finally:
        handle.remove()
        with torch.no_grad():
            last.weight.copy_(saved[0])
            last.bias.copy_(saved[1])


def test_float64_input_accepted_and_stored_float32(pipe: StreamDiffVSR) -> None:
    f0 = _frames(1)[0]
    n0 = _noises(1)[0]
    a, sa = pipe.process_frame(f0, noise=n0)
    b, sb = pipe.process_frame(f0.double(), noise=n0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert sb.prev_lq.dtype == torch.float32


def test_same_noise_same_output_and_generator(pipe: StreamDiffVSR) -> None:
    f0 = _frames(1)[0]
    shape = (1, 4, H, W)
    explicit = torch.randn(shape, generator=torch.Generator().manual_seed(42))
    a, _ = pipe.process_frame(f0, noise=explicit)
    b, _ = pipe.process_frame(f0, noise=explicit.clone())
    assert torch.equal(a, b)
    c, _ = pipe.process_frame(f0, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, c)
    d, _ = pipe.process_frame(f0, generator=torch.Generator().manual_seed(43))
    assert float((a - d).abs().max()) > 1e-4  # the noise matters


def test_old_state_can_rerun_a_frame(pipe: StreamDiffVSR) -> None:
    f0, f1 = _frames(2)
    n0, n1 = _noises(2)
    _, s0 = pipe.process_frame(f0, noise=n0)
    a, _ = pipe.process_frame(f1, s0, noise=n1)
    b, _ = pipe.process_frame(f1, s0, noise=n1)
    assert torch.equal(a, b)


def test_save_load_mid_stream_is_seamless(pipe: StreamDiffVSR, tmp_path: Path) -> None:
    frames = _frames(3)
    noises = _noises(3)
    state = StreamState()
    straight = []
    for f, n in zip(frames, noises):
        hq, state = pipe.process_frame(f, state, noise=n)
        straight.append(hq)

    state = StreamState()
    resumed = []
    for i, (f, n) in enumerate(zip(frames, noises)):
        if i == 2:
            state.save(tmp_path / "state.safetensors")
            del state
            state = StreamState.load(tmp_path / "state.safetensors")
        hq, state = pipe.process_frame(f, state, noise=n)
        resumed.append(hq)
    assert state.frame_count == 3
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_reused_input_buffer_does_not_corrupt_state(pipe: StreamDiffVSR) -> None:
    """A reader that refills one buffer per frame must get the same results as fresh tensors.

    The state is documented as immutable and keeps the previous LR frame for the optical flow, so it
    must not alias the caller's input tensor.
    """
    frames = _frames(3)
    noises = _noises(3)
    state = StreamState()
    fresh = []
    for f, n in zip(frames, noises):
        hq, state = pipe.process_frame(f.clone(), state, noise=n)
        fresh.append(hq)

    buf = torch.empty(1, 3, H, W)
    state = StreamState()
    reused = []
    for f, n in zip(frames, noises):
        buf.copy_(f)
        hq, state = pipe.process_frame(buf, state, noise=n)
        reused.append(hq)
        torch.testing.assert_close(state.prev_lq, f, atol=0, rtol=0)
    buf.fill_(0.5)
    torch.testing.assert_close(state.prev_lq, frames[-1], atol=0, rtol=0)
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ errors

def _assert_plain(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg
    for bad in ("Traceback", "aten::", ".cpp", 'File "', "c10::"):
        assert bad not in msg, msg


def _bad_inputs() -> list[tuple[str, object]]:
    ok = torch.rand(1, 3, H, W)
    nan = ok.clone()
    nan[0, 1, 5, 5] = float("nan")
    return [
        ("ndarray", np.random.rand(1, 3, H, W).astype(np.float32)),
        ("list", [[0.5]]),
        ("4 channels", torch.rand(1, 4, H, W)),
        ("batch 2", torch.rand(2, 3, H, W)),
        ("batch 0", torch.rand(0, 3, H, W)),
        ("3-D", torch.rand(3, H, W)),
        ("5-D", torch.rand(1, 1, 3, H, W)),
        ("uint8", (ok * 255).to(torch.uint8)),
        ("int64", torch.zeros(1, 3, H, W, dtype=torch.long)),
        ("bool", torch.zeros(1, 3, H, W, dtype=torch.bool)),
        ("h too small", torch.rand(1, 3, 28, W)),
        ("w too small", torch.rand(1, 3, H, 28)),
        ("h too large", torch.rand(1, 3, 4100, W)),
        ("w too large", torch.rand(1, 3, H, 4100)),
        ("above 1", ok * 1.5),
        ("below 0", ok - 0.25),
        ("0..255 floats", ok * 255),
        ("nan", nan),
        ("inf", torch.full((1, 3, H, W), float("inf"))),
    ]


@pytest.mark.parametrize("name,lq", _bad_inputs(), ids=[n for n, _ in _bad_inputs()])
def test_bad_lq_raises_value_error(pipe: StreamDiffVSR, name: str, lq: object) -> None:
    with pytest.raises(ValueError) as info:
        pipe.process_frame(lq, noise=torch.zeros(1, 4, H, W))
    _assert_plain(info.value)


@pytest.mark.parametrize("noise", [torch.zeros(1, 4, H, W + 4), torch.zeros(4, H, W), torch.zeros(1, 3, H, W),
                                   np.zeros((1, 4, H, W), dtype=np.float32)],
                         ids=["wrong w", "3-D", "3 channels", "ndarray"])
def test_bad_noise_raises_value_error(pipe: StreamDiffVSR, noise: object) -> None:
    with pytest.raises(ValueError) as info:
        pipe.process_frame(torch.rand(1, 3, H, W), noise=noise)
    _assert_plain(info.value)
    assert "noise" in str(info.value)


def test_frame_size_change_raises(pipe: StreamDiffVSR) -> None:
    _, state = pipe.process_frame(torch.rand(1, 3, 32, 32), noise=torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError) as info:
        pipe.process_frame(torch.rand(1, 3, H, W), state, noise=torch.zeros(1, 4, H, W))
    _assert_plain(info.value)
    # A fresh state accepts the new size.
    hq, _ = pipe.process_frame(torch.rand(1, 3, H, W), StreamState(), noise=torch.zeros(1, 4, H, W))
    assert hq.shape == (1, 3, 4 * H, 4 * W)


def test_bad_state_type_raises(pipe: StreamDiffVSR) -> None:
    with pytest.raises(ValueError) as info:
        pipe.process_frame(torch.rand(1, 3, H, W), {"prev_hq": None}, noise=torch.zeros(1, 4, H, W))
    _assert_plain(info.value)


def test_from_pretrained_cuda_without_gpu(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError) as info:
            StreamDiffVSR.from_pretrained(tiny_ckpt, device=dev, dtype=torch.float32)
        _assert_plain(info.value)
        assert "CUDA" in str(info.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "meta", "not a device"])
def test_from_pretrained_bad_device(tiny_ckpt: Path, device: str) -> None:
    with pytest.raises(ValueError) as info:
        StreamDiffVSR.from_pretrained(tiny_ckpt, device=device, dtype=torch.float32)
    _assert_plain(info.value)


@pytest.mark.parametrize("dtype", ["float64", "fp8", "int8", torch.float64, torch.int32, "", 32])
def test_from_pretrained_bad_dtype(tiny_ckpt: Path, dtype: object) -> None:
    with pytest.raises(ValueError) as info:
        StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype=dtype)
    _assert_plain(info.value)
    assert "dtype" in str(info.value)


def test_from_pretrained_bad_component_dtype_names_its_option(tiny_ckpt: Path) -> None:
    """vae_dtype said "dtype must be ..." before, which sent the user to an option they had not set."""
    for option in ("vae_dtype", "raft_dtype"):
        with pytest.raises(ValueError) as info:
            StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", **{option: "fp8"})
        _assert_plain(info.value)
        assert str(info.value).startswith(f"{option} must be None, float32, float16 or bfloat16, got 'fp8'")


def test_from_pretrained_default_dtype_follows_the_device(tiny_ckpt: Path) -> None:
    """No dtype: float32 on the CPU (as upscale() does), where half-precision kernels are the slow ones."""
    from vsstreamdiffvsr import Options

    pipe = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu")
    assert pipe.dtype == torch.float32 and next(pipe.components.unet.parameters()).dtype == torch.float32
    assert Options(device="cuda").unet_dtype == torch.float16


def test_float16_on_the_cpu_warns_once_per_load_and_names_the_option(tiny_ckpt: Path) -> None:
    """CPU float16 convolutions are hundreds of times slower than float32 ones (see warn_cpu_float16): asking
    for them there gets one warning naming the option, and is still honoured. bfloat16 and float32 do not warn."""
    import warnings

    from vsstreamdiffvsr.errors import SlowPrecisionWarning

    with pytest.warns(SlowPrecisionWarning) as caught:
        half = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float16", raft_dtype="fp16")
    slow = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]  # not other libraries' warnings
    assert len(slow) == 1 and "dtype, raft_dtype=float16 on the CPU" in str(slow[0].message)
    assert slow[0].filename == __file__  # pointed at the caller's line
    assert half.dtype == torch.float16 and half.options.raft_dtype == torch.float16
    with pytest.warns(SlowPrecisionWarning, match="vae_dtype=float16"):
        StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", vae_dtype=torch.float16)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        pipe = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16", raft_dtype="bfloat16")
        pipe.with_options(raft_dtype="float32")
    assert not [w for w in quiet if issubclass(w.category, SlowPrecisionWarning)]
    with pytest.warns(SlowPrecisionWarning, match="raft_dtype=float16"):
        pipe.with_options(raft_dtype="float16")


# ------------------------------------------------------------------------------------------------ batches

def test_a_batch_of_streams_equals_each_stream_alone(pipe: StreamDiffVSR) -> None:
    """process_batch advances B independent streams by one frame each: every stream's frames and states equal
    its own process_frame run (float32 on the CPU: within rounding of batched kernels), cold and warm streams
    mixed in one call, and the stages see the batch dimension (one U-Net call per step for the warm ones)."""
    streams = [(_frames(3, seed=s), _noises(3, seed=100 + s)) for s in range(3)]
    alone = []
    for frames, noises in streams:
        state, outs = StreamState(), []
        for f, n in zip(frames, noises):
            hq, state = pipe.process_frame(f, state, noise=n)
            outs.append(hq)
        alone.append(outs)
    states: list[StreamState | None] = [None, None, None]
    for i in range(3):
        if i == 1:
            states[2] = None  # stream 2 restarts (a cut): one cold stream beside two warm ones
        lq = torch.cat([frames[i] for frames, _ in streams])
        noise = torch.cat([noises[i] for _, noises in streams])
        hq, states = pipe.process_batch(lq, states, noise=noise)
        assert hq.shape == (3, 3, 4 * H, 4 * W) and [s.frame_count for s in states] == [i + 1, i + 1, i if i else 1]
        for b in (0, 1):
            assert float((hq[b:b + 1] - alone[b][i]).abs().max()) <= 1e-5, (i, b)
    # stream 2 restarted at frame 1: its last frame is a two-frame run from there
    frames, noises = streams[2]
    _, s = pipe.process_frame(frames[1], noise=noises[1])
    last, _ = pipe.process_frame(frames[2], s, noise=noises[2])
    assert float((hq[2:3] - last).abs().max()) <= 1e-5


def test_a_batch_is_checked_like_a_frame(pipe: StreamDiffVSR) -> None:
    lq = torch.rand(2, 3, H, W)
    with pytest.raises(ValueError, match="one StreamState"):
        pipe.process_batch(lq, [None])
    with pytest.raises(ValueError, match="noise must have shape"):
        pipe.process_batch(lq, [None, None], noise=torch.zeros(1, 4, H, W))
    _, (s, _) = pipe.process_batch(lq, [None, None], noise=torch.zeros(2, 4, H, W))
    with pytest.raises(ValueError, match="differs from the previous frame"):
        pipe.process_batch(torch.rand(2, 3, 32, 32), [s, None], noise=torch.zeros(2, 4, 32, 32))

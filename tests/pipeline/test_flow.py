"""Optical flow in the pipeline: RAFT's correlation blocks (float32, float16, lean) against torchvision,
flow at LR, the flow prefetched on a side stream and its kept features, RAFT's networks in half precision.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vsstreamdiffvsr import Options, StreamDiffVSR, StreamState
from vsstreamdiffvsr.pipeline.flow import FlowStage, FlowTicket

from ..streams import frames_and_noise, psnr, run


def flow_of(pipe: StreamDiffVSR, x: torch.Tensor, xp: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The pipeline's flow stage's flow of LR frames in [-1, 1] (mode=, corr= override the options)."""
    return pipe.flow.flow_and_features(x, xp, **kwargs)[0]


def raft32(pipe: StreamDiffVSR):  # noqa: ANN201
    return pipe.components.raft(torch.float32)


def test_flow_lr_is_upsampled_raft_at_lr(pipe: StreamDiffVSR) -> None:
    g = torch.Generator().manual_seed(3)
    x, xp = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1, torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    with torch.inference_mode():
        got = flow_of(pipe, x, xp, mode="lr")
        want = F.interpolate(raft32(pipe).raft(x, xp, num_flow_updates=12)[-1], scale_factor=4, mode="bilinear",
                             align_corners=False) * 4
    assert got.shape == (1, 2, 512, 512)
    assert float((got - want).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match='flow="lr"'):
        flow_of(pipe, x[..., :64, :64], xp[..., :64, :64], mode="lr")
    with pytest.raises(ValueError, match="flow"):
        pipe.with_options(flow="quarter")


def test_lean_correlation_matches_torchvision() -> None:
    from torchvision.models.optical_flow.raft import CorrBlock

    from vsstreamdiffvsr.models.correlation import LeanCorrBlock

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

    from vsstreamdiffvsr.models.correlation import HalfCorrBlock

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
            powers_of_two = [2.0**k for k in range(1, 20)]
            assert unscale == 1.0 if scale == 1.0 or dtype == torch.float32 else unscale in powers_of_two
            got = block.index_pyramid(coords)
            assert got.shape == want.shape == (1, 324, 16, 20) and got.dtype == torch.float32
            assert float((got - want).abs().max()) <= tol * float(want.abs().max()), (scale, dtype, mm)


def test_half_correlation_levels_are_products_with_the_pooled_second_features() -> None:
    """Level l is f1/sqrt(C) times the 2^l-pooled f2 (pooling is linear): the reference's pooled volume up to
    float32 rounding, rounded once to float16. On CUDA's route (float16 matmul inputs) each stored value is the
    float32 product of the inputs rounded to float16's 11 significant bits (TF32's), rounded once more."""
    from vsstreamdiffvsr.models.correlation import HalfCorrBlock

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
        full = flow_of(pipe, x, xp, corr="full")
        lean = flow_of(pipe, x, xp, corr="lean")
        half = flow_of(pipe, x, xp, corr="half")
    assert float((full - lean).abs().max()) <= 1e-4
    assert 0 < float((full - half).abs().max()) <= 2e-2  # float16 storage: close, not identical
    assert raft32(pipe).raft.corr_block is raft32(pipe)._full_block  # restored after the call
    assert not raft32(pipe)._blocks["half"].corr_pyramid             # and the pyramid freed
    assert [pipe.options.corr_for(h, w) for h, w in ((720, 1280), (1088, 1920), (2160, 3840))] == [
        "full", "half", "lean"]
    assert pipe.with_options(raft_corr="half").options.corr_for(720, 1280) == "half"
    with pytest.raises(ValueError, match="raft_corr"):
        pipe.with_options(raft_corr="huge")


def test_raft_dtype_auto_is_float16_from_1080p_on_cuda_for_a_float16_pipeline() -> None:
    """raft_dtype None (auto): RAFT's networks in float16 where the float32 pyramid no longer fits its budget
    (1080p output and up) on CUDA with a float16 U-Net; float32, the reference, everywhere else; an explicit
    precision is kept at every size."""
    from vsstreamdiffvsr.options import resolve_raft_dtype

    cuda, cpu, f16, f32 = torch.device("cuda"), torch.device("cpu"), torch.float16, torch.float32
    sizes = ((720, 1280), (1088, 1920), (2160, 3840), (272, 480))  # HR 720p, 1080p, 4K; 1080p at LR (flow="lr")
    assert [resolve_raft_dtype(None, f16, cuda, h, w) for h, w in sizes] == [f32, f16, f16, f32]
    for dtype, device in ((torch.bfloat16, cuda), (f32, cuda), (f16, cpu)):
        assert {resolve_raft_dtype(None, dtype, device, h, w) for h, w in sizes} == {f32}, (dtype, device)
    for given in (f32, f16, torch.bfloat16):
        assert {resolve_raft_dtype(given, f16, cuda, h, w) for h, w in sizes} == {given}
    assert [Options(raft_dtype=v).raft_dtype for v in (None, "AUTO", "fp16")] == [None, None, f16]


def test_raft_precision_is_chosen_per_frame_size(pipe: StreamDiffVSR, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow stage asks Options.raft_dtype_for(RAFT input size) on every flow, ahead and in line: with a rule
    that picks bfloat16 for the larger of two sizes only (CUDA's auto rule cannot fire on a CPU), each size's
    flow is that precision's (and so is its frame), and only the half-precision flow gets the NaN check."""
    real_rule = Options.raft_dtype_for

    def rule(self: Options, h: int, w: int) -> torch.dtype:
        if self.raft_dtype is not None:
            return self.raft_dtype  # type: ignore[return-value]
        return torch.bfloat16 if h * w > 128 * 160 else real_rule(self, h, w)

    monkeypatch.setattr(Options, "raft_dtype_for", rule)
    checked: list[bool] = []
    real_warp = FlowStage.warp_previous

    def warp_spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        out = real_warp(self, *a, **k)
        checked.append(out[1] is not None)  # a flow-finiteness check is pending
        return out

    monkeypatch.setattr(FlowStage, "warp_previous", warp_spy)
    view = pipe.with_options()
    for h, w, want in ((32, 40, "float32"), (48, 40, "bfloat16")):  # RAFT at HR: 128x160 and 192x160
        fixed = pipe.with_options(raft_dtype=want)
        frames, noises = frames_and_noise(2, h, w, seed=9)
        with torch.inference_mode():
            x, xp = frames[1] * 2 - 1, frames[0] * 2 - 1
            ticket = view.prefetch_flow(frames[1], frames[0])
            assert torch.equal(ticket.result(), flow_of(fixed, x, xp)), (h, w)
        assert ticket.raft_dtype == getattr(torch, want)  # what made the flow
        checked.clear()
        got = run(view, frames, noises)
        assert checked == [want == "bfloat16"], (h, w)  # float32: no flow check; bfloat16: its warm frame's
        assert torch.equal(got[1], run(fixed, frames, noises)[1]), (h, w)
    # where RAFT at HR ran out of memory for a size, its flow comes from RAFT at LR, in that size's precision
    assert view.flow.dtype_for(x) == torch.bfloat16
    view.model.flow_fallbacks[view.flow.key(x)] = "lr"
    try:
        assert view.flow.dtype_for(x) == torch.float32
    finally:
        del view.model.flow_fallbacks[view.flow.key(x)]  # the session's model is shared
    # a flow tensor handed in was not made by this RAFT: no flow check, whatever the size's precision
    with torch.inference_mode():
        _, state = view.process_frame(frames[0], noise=noises[0])
        warped, flow_ok, made_by = view.flow.warp_previous(x, state.prev_hq, state.prev_lq,
                                                           FlowTicket(torch.zeros(1, 2, 4 * 48, 4 * 40)))
    assert flow_ok is None and made_by is None and warped.shape == (1, 3, 4 * 48, 4 * 40)


def test_half_precision_raft_is_made_before_frames_run(pipe: StreamDiffVSR) -> None:
    """A half-precision RAFT copy is made when the option that may pick it is set, not by the first flow that
    needs it (on CUDA that could be a side stream's, reading the weights before their cast ran), and as
    ordinary weights, not inference tensors."""
    import dataclasses

    view = pipe.with_options(raft_dtype="bfloat16")
    assert torch.bfloat16 in view.components.rafts  # before any flow
    assert not any(p.is_inference() for p in view.components.rafts[torch.bfloat16].parameters())
    late = dataclasses.replace(pipe.components, rafts={torch.float32: raft32(pipe)})  # (the shared one stays)
    with torch.inference_mode():  # a precision nothing foresaw: made on first use, still ordinary weights
        net = late.raft(torch.float16)
    assert not any(p.is_inference() for p in net.parameters())


def _queue_next(pipe: StreamDiffVSR, frames: list[torch.Tensor], i: int, into: list, **kwargs: object):
    """A process_frame ``on_enqueued`` callback, as the filter's: prefetch the flow of frame i+1 against frame i
    (with ``kwargs``: ready=, after=) into ``into``; nothing after the last frame."""
    def queue() -> None:
        if i + 1 < len(frames):
            into.append(pipe.prefetch_flow(frames[i + 1], frames[i], **kwargs))

    return queue


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
            nxt = []
            queue = _queue_next(pipe, frames, i, nxt, ready=pipe.inputs_ready())
            hq, state = pipe.process_frame(f, state, noise=z, flow=ticket, on_enqueued=queue)
        outs.append(hq)
        ticket = nxt[0] if nxt else None
    for a, b in zip(outs, inline):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="flow must have shape"):
        pipe.process_frame(frames[1], state, noise=noises[1], flow=torch.zeros(1, 2, 64, 64))


def test_device_corr_block_equals_torchvision() -> None:
    from torchvision.models.optical_flow.raft import CorrBlock

    from vsstreamdiffvsr.models.correlation import full_corr_block

    g = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(1, 32, 16, 24, generator=g), torch.randn(1, 32, 16, 24, generator=g)
    ref, ours = CorrBlock(num_levels=4, radius=4), full_corr_block(4, 4)
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
        flow = flow_of(pipe, x, xp, mode="lr")
    assert flow.shape == (1, 2, 528, 560)
    assert torch.isfinite(flow).all()


def test_prefetch_reuses_the_previous_frames_raft_features(pipe: StreamDiffVSR) -> None:
    """after=: frame i's RAFT feature map, made for flow(i, i-1), serves flow(i+1, i); same output."""
    frames, noises = frames_and_noise(4, 32, 32, seed=8)
    inline = run(pipe, frames, noises)
    encoded: list[int] = []
    hook = raft32(pipe).raft.feature_encoder.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0]))
    try:
        state, outs, ticket = StreamState(), [], None
        for i, (f, z) in enumerate(zip(frames, noises)):
            nxt: list = []
            queue = _queue_next(pipe, frames, i, nxt, after=ticket)
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


def test_half_precision_raft_is_a_view_option_close_to_float32(tiny_ckpt: Path, pipe: StreamDiffVSR) -> None:
    """raft_dtype: RAFT's networks in half precision, one copy shared by every view, the flow and the picture
    close to float32 RAFT's; from_pretrained takes it too, and a bad value is refused naming the option."""
    frames, noises = frames_and_noise(2, 32, 40, seed=3)
    ref = run(pipe, frames, noises)
    view = pipe.with_options(raft_dtype="bfloat16")  # (CPU float16 convolutions are slow; same code path)
    assert view.options.raft_dtype == view.options.raft_dtype_for(128, 160) == torch.bfloat16
    assert pipe.options.raft_dtype is None and pipe.options.raft_dtype_for(128, 160) == torch.float32  # auto, CPU
    net = view.components.raft(torch.bfloat16)
    assert next(net.raft.parameters()).dtype == torch.bfloat16
    assert next(raft32(pipe).raft.parameters()).dtype == torch.float32
    assert pipe.with_options(raft_dtype=torch.bfloat16).components.raft(torch.bfloat16) is net  # made once, shared
    assert view.with_options(tile=64).options.raft_dtype == torch.bfloat16  # kept by views of the view
    out = run(view, frames, noises)
    with torch.inference_mode():
        x, xp = frames[1] * 2 - 1, frames[0] * 2 - 1
        moved = float((flow_of(view, x, xp) - flow_of(pipe, x, xp)).abs().max())
    assert 0.0 < moved <= 0.5
    assert torch.equal(out[0], ref[0])  # a cold frame has no flow
    assert out[1].dtype == torch.float32 and 30.0 <= psnr(out[1], ref[1]) < 200.0
    loaded = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", raft_dtype="bfloat16")
    assert loaded.options.raft_dtype == torch.bfloat16 and torch.bfloat16 in loaded.components.rafts
    for bad in ("float64", "half-ish", 16):
        with pytest.raises(ValueError, match=r"raft_dtype must be None, float32, float16 or bfloat16"):
            pipe.with_options(raft_dtype=bad)

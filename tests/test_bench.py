"""scripts/bench.py runs end to end (CPU, tiny model). No timing is asserted: only that it measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--tiny", "--device", "cpu",
                          "--frames", "3", "--warmup", "1", "--lr", "32x32", "--dtype", "float16,bfloat16",
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| path | ms/frame")
    assert any(line.startswith("| reference |") for line in lines)
    assert any(line.startswith("| optimized (float16)") for line in lines)     # one path per --dtype
    assert any(line.startswith("| optimized (bfloat16)") for line in lines)
    assert "float32 picture: mean" in res.stdout
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    ref, fp16, bf16 = (data["results"][k] for k in ("reference", "optimized (float16)", "optimized (bfloat16)"))
    assert data["settings"]["frames"] == 3 and data["settings"]["warmup"] == 1 and "torch" in data
    assert ref["ms"] > 0 and fp16["ms"] > 0 and bf16["ms"] > 0
    assert ref["psnr_vs_fp32"] is None                    # the reference is the float32 output itself (inf)
    assert 35.0 < bf16["psnr_vs_fp32"] < float("inf")     # bf16: close, not identical
    assert bf16["psnr_vs_fp32"] < fp16["psnr_vs_fp32"] < float("inf")  # fp16: 3 more mantissa bits, closer
    assert ref["picture"]["std"] > 0.1                     # ... on a picture with range (calibrated weights)


@pytest.mark.parametrize(("args", "needle"), [
    (["--frames", "2", "--warmup", "4"], "--frames (2) must be larger than --warmup"),
    (["--tile", "100"], "multiples of 8"),
    (["--flow", "lr", "--lr", "64x64"], "at least 128 px with --flow lr"),
    (["--graph-flow"], "--graph-flow needs a CUDA device"),
    (["--lr", "320"], "WIDTHxHEIGHT"),
    (["--dtype", "int8"], "dtype must be"),
    (["--dtype", "float16,fp16"], "lists a precision twice"),
    (["--raft-dtype", "fp8"], "raft_dtype must be None (auto), float32, float16 or bfloat16"),
    (["--vae-dtype", "fp8"], "vae_dtype must be None, float32, float16 or bfloat16"),
])
def test_bench_rejects_bad_options_before_loading(args: list[str], needle: str) -> None:
    """One line naming the option, at once: not a traceback after minutes of loading and a reference run."""
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--tiny", "--device", "cpu", *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_device_bench_driver_smoke(tmp_path: Path) -> None:
    """The one-shot GPU driver runs its steps in order, saves after each, and lists what did not fit."""
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "device_bench.py"), "--tiny", "--device", "cpu",
                          "--frames", "3", "--warmup", "1",
                          "--steps", "pyramid,720p-ref,720p-eager,denoise-profile,720p-graphs",
                          # the budget leaves minutes of slack for the 3 small steps on a loaded machine, and is
                          # below 720p-graphs's own estimate (first compile 110 s + 30), which is always skipped
                          "--budget-s", "135", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    paths = data["results"]["720p"]
    assert list(paths) == ["reference (fp32/TF32, eager)",
                           "optimised eager: fp16 + channels_last + cuDNN autotune + flow overlap"]
    assert 35.0 < paths["optimised eager: fp16 + channels_last + cuDNN autotune + flow overlap"]["psnr_vs_fp32"]
    assert data["notes"] == [data["notes"][0]] and data["notes"][0].startswith("skipped: 720p-graphs")
    assert "| reference (fp32/TF32, eager) |" in (tmp_path / "tables.md").read_text()
    profile = data["denoise_profiles"]["720p-eager"]  # the warm frame's denoise + decode, by op category
    assert profile["convolution"] > 0 and profile["attention"] > 0
    assert "| convolution |" in (tmp_path / "denoise-profile-720p-eager.txt").read_text()
    pyramids = data["pyramids"]  # the correlation pyramid's three builds, 720p and 1080p, and their lookups
    assert len(pyramids) == 6 and all(r["build_ms"] > 0 for r in pyramids.values())
    assert all(r["lookup_rel_err_vs_full"] <= 2e-3 for r in pyramids.values())
    assert "float16 pyramid, float16 matmuls |" in (tmp_path / "tables.md").read_text()


def test_device_bench_kernel_categories() -> None:
    """CUDA kernel names (cuDNN, cuBLAS, flash attention, inductor) land in the right profile category."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from device_bench import Driver
    finally:
        sys.path.remove(str(REPO / "scripts"))
    cat = Driver.kernel_category
    assert cat("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert cat("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert cat("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert cat("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert cat("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>") == "norm"
    assert cat("void cudnn::engines_precompiled::nchwToNhwcKernel<float>") == "layout conversion"
    assert cat("triton_per_fused_native_group_norm_silu_3") == "inductor: norm fused"
    assert cat("triton_poi_fused_add_convolution_silu_0") == "inductor: pointwise fused"
    assert cat("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "elementwise"


def _bench():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return bench


def test_table_renders_results_read_back_from_json() -> None:
    """A second process's results come back through JSON, where nan and inf were written as null: the table
    shows "-" for them (run 7's dry run crashed on its 720p-cached step here)."""
    bench = _bench()
    measured = dict(ms=90.0, first_ms=900.0, warmup_overhead_s=1.0, peak_gib=float("nan"), warmup=1,
                    peak_by_frame_gib=[float("nan")] * 3, psnr_vs_fp32=float("inf"))
    read_back = json.loads(json.dumps(bench._finite(measured)))
    assert read_back["peak_gib"] is None and read_back["psnr_vs_fp32"] is None
    text = bench.table({"first": measured, "read back": read_back}, "### t")
    assert "| first | 90.0 | 900 | 1.0 | - | - | - | 1.00x |" in text
    assert "| read back | 90.0 | 900 | 1.0 | - | - | - | 1.00x |" in text


def test_random_weights_are_calibrated_to_a_picture_with_range() -> None:
    """Random full-size weights decode to a nearly black frame; the bench calibrates them so that its PSNR
    compares pictures (the release's architecture at 32x32 LR on the CPU: ~20 s)."""
    import torch

    bench = _bench()
    cpu = torch.device("cpu")
    frames, noises = bench.make_frames(2, 32, 32)

    def picture(load: dict) -> dict:
        return bench.picture_stats(bench.measure(bench.build(load, cpu, torch.float32), frames, noises, 1, cpu)["outs"])

    load = bench.random_full_components()
    before = picture(load)
    assert before["std"] < 0.05 and before["clamped"] > 0.3, before  # what the PSNR would otherwise be taken on
    bench.calibrate_random(load, 32, 32)
    after = picture(load)
    assert 0.35 < after["mean"] < 0.65 and 0.12 < after["std"] < 0.3 and after["clamped"] < 0.05, after


def test_reference_path_embeds_the_condition_at_every_step_with_the_same_output() -> None:
    """The bench's reference executes like upstream (ControlNet embedding inside every step): same numbers."""
    bench = _bench()
    import torch

    load, _ = bench.load_components(torch.device("cpu"), tiny=True)
    frames, noises = bench.make_frames(3, 32, 32)
    ref = bench.build(load, torch.device("cpu"), torch.float32, upstream_execution=True)
    ours = bench.build(load, torch.device("cpu"), torch.float32)
    assert ref.cond_embedding is None and ours.cond_embedding is not None
    calls = []
    ref.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *a: calls.append(1))
    a = bench.measure(ref, frames, noises, 1, torch.device("cpu"))["outs"]
    b = bench.measure(ours, frames, noises, 1, torch.device("cpu"))["outs"]
    assert len(calls) == 2 * 4  # two warm frames, four steps each
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_flops_counts_every_component_of_a_frame() -> None:
    """scripts/flops.py counts the full-size architecture on the meta device (shapes only, seconds)."""
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "flops.py"), "--lr", "64x48"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in res.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| component")}
    per_call = {k: float(v[0]) for k, v in rows.items() if not k.startswith("**")}
    assert len(per_call) == 7 and all(v > 0 for v in per_call.values()), rows
    assert per_call["U-Net step"] > per_call["ControlNet step (embedding split off)"] > per_call["decoder with TPM"]
    ours = float(rows["**frame**"][2].strip("* "))
    ref = float(rows["**frame as the reference executes it**"][2].strip("* "))
    saved = 3 * per_call["ARTG condition embedding"] + per_call["RAFT feature encoder, one frame"]
    assert abs(ref - ours - saved) < 0.02 and ref > ours


def test_the_optimized_path_label_says_where_raft_is_compiled() -> None:
    """RAFT is compiled with --compile on CUDA by default, never with the lean correlation (4K), which runs
    eagerly: the row's label must not claim a compiled RAFT there."""
    import argparse

    import torch

    bench = _bench()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def label(device, w, h, **kw) -> str:
        args = argparse.Namespace(**{"compile_flow": None, "compile": True, "flow": "hr", "raft_corr": "auto", **kw})
        return bench.raft_label(args, device, w, h)

    assert label(cuda, 320, 180) == "RAFT compiled" and label(cuda, 480, 272) == "RAFT compiled"
    assert label(cuda, 960, 540) == "RAFT eager (lean correlation)"
    assert label(cuda, 960, 540, flow="lr") == "RAFT compiled"  # RAFT at LR: a small pyramid
    assert label(cuda, 320, 180, raft_corr="lean") == "RAFT eager (lean correlation)"
    assert label(cuda, 320, 180, compile_flow=False) == "" and label(cpu, 320, 180) == ""
    assert label(cpu, 320, 180, compile=False, compile_flow=True) == "RAFT compiled"


def test_the_optimized_path_label_says_when_raft_runs_in_half_precision() -> None:
    """The pipeline runs RAFT's networks in float16 from 1080p on CUDA for a float16 path (raft_dtype auto):
    the row must say so, and say when --raft-dtype chose it; the float32 reference path never does."""
    import torch

    bench = _bench()
    cuda, cpu, f16 = torch.device("cuda"), torch.device("cpu"), torch.float16

    def label(device, dtype, w, h, flow="hr", raft_dtype=None) -> str:  # --flow, --raft-dtype
        return bench.half_raft_label(raft_dtype, flow, dtype, device, w, h)

    assert label(cuda, f16, 320, 180) == "" and label(cuda, f16, 480, 272) == "RAFT float16 (auto)"
    assert label(cuda, f16, 480, 272, flow="lr") == ""  # RAFT at LR: 720p-sized work
    assert label(cuda, torch.float32, 480, 272) == "" and label(cpu, f16, 480, 272) == ""
    assert label(cuda, f16, 480, 272, raft_dtype="float32") == ""
    assert label(cuda, f16, 320, 180, raft_dtype="fp16") == "RAFT float16"
    assert label(cuda, f16, 480, 272, raft_dtype="auto") == "RAFT float16 (auto)"
    assert bench.REFERENCE_OPTIONS["raft_dtype"] == "float32"

"""scripts/bench.py, device_bench.py and flops.py on the CPU with the tiny model (no timing is asserted).

About 2-4 minutes on a 2-core machine, most of it the two end-to-end runs (bench.py's rows, device_bench.py's
dry run) and flops.py, each in its own process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from vsstreamdiffvsr import Options, StreamDiffVSR

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def _script(name: str) -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _script("bench")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the in-process runs (a busy 2-core machine ran tiny frames ~10x slower with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plan(bench: ModuleType, *argv: str) -> Any:
    return bench.plan(bench.parser().parse_args(list(argv)))


# --------------------------------------------------------------------------------------------- flags -> Options

def test_every_options_field_is_a_flag_and_the_flags_build_options(bench: ModuleType) -> None:
    """One definition of each option: every Options field is a flag, read by Options.from_strings."""
    flags = {s for a in bench.parser()._actions for s in a.option_strings}
    for f in dataclasses.fields(Options):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    p = _plan(bench, "--device", "cpu", "--dtype", "bf16", "--compile", "0", "--raft-corr", "half", "--tile", "64",
              "--no-prefetch-flow", "--compile-mode", "default", "--tile-denoise", "--also", "dtype=float32",
              "compile=1", "--also", "channels_last=1")
    want = Options(device="cpu", dtype=torch.bfloat16, compile=False, raft_corr="half", tile=64, prefetch_flow=False,
                   compile_mode="default", tile_denoise=True)
    assert p.ours == want
    assert p.also == [dataclasses.replace(want, dtype=torch.float32, compile=True),
                      dataclasses.replace(want, channels_last=True)]
    assert bench.row_name(p.ours).startswith("Options(dtype=bfloat16, raft_corr=half, compile=False")
    assert bench.row_name(Options(device="cpu")) == "default: Options()"
    ref = _plan(bench, "--device", "cpu", "--reference-options", "raft_corr=lean").reference
    assert ref == bench.reference_options("cpu", raft_corr="lean") and ref.unet_dtype == torch.float32


def test_the_cpu_default_is_float32_eager_and_small(bench: ModuleType) -> None:
    """`--tiny --device cpu` must finish quickly: float32 (not float16, ~300x slower on a CPU), tiny frames."""
    p = _plan(bench, "--tiny", "--device", "cpu")
    assert p.ours == Options(device="cpu") and p.ours.unet_dtype == torch.float32 and not p.ours.compiled
    assert (p.w, p.h, p.frames, p.warmup) == (48, 32, 3, 1)
    assert p.rows == ["reference", "ours"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--frames", "2", "--warmup", "4"], "--frames (2) must be larger than --warmup"),
    (["--tile", "100"], "multiples of 8"),
    (["--flow", "lr", "--lr", "64x64"], "flow=lr needs LR sides of at least 128 px"),
    (["--lr", "320"], "WIDTHxHEIGHT"),
    (["--dtype", "int8"], "dtype must be"),
    (["--raft-dtype", "fp8"], "raft_dtype must be"),
    (["--compile", "maybe"], "compile must be 0 or 1"),
    (["--rows", "reference,nope"], "--rows: unknown ['nope']"),
    (["--also", "dtype"], "--also takes FIELD=VALUE"),
    (["--also", "colour=red"], "unknown option 'colour'"),
    (["--inductor", "no_such_knob=1"], "has no setting 'no_such_knob'"),
    (["--inductor", "coordinate_descent_tuning=maybe"], "coordinate_descent_tuning takes a bool"),
    (["--batch", "1,x", "--rows", "batch"], "--batch must be comma-separated integers"),
    (["--model-dir", "m"], "--tiny and --model-dir exclude each other"),
])
def test_bad_flags_fail_with_one_line_before_any_weights_load(bench: ModuleType, capsys: pytest.CaptureFixture[str],
                                                             argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--tiny", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err, err
    assert err.count("\n") == 1 and err.startswith("bench.py: error: ") and "Traceback" not in err


# --------------------------------------------------------------------------------------------- rows end to end

def test_rows_run_side_by_side_and_the_json_round_trips(bench: ModuleType, tmp_path: Path) -> None:
    """The reference, ours, an --also row and batched rows in one process; the JSON is strict and renders the
    same tables as printed (the step that merges them reads only the JSON)."""
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--tiny", "--device", "cpu", "--lr", "32x36",
                          "--frames", "2", "--warmup", "1", "--rows", "reference,ours,batch", "--batch", "1,2",
                          "--also", "dtype=bfloat16", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert res.stdout.strip() == bench.render(data).strip()
    assert data["complete"] and data["gpu"] == "CPU" and data["lr"] == [32, 36] and "torch" in data
    rows = data["rows"]
    assert list(rows) == ["reference", "default: Options()", "default: Options(), B=1 streams",
                          "default: Options(), B=2 streams", "Options(dtype=bfloat16)"]
    ref, ours, b1, b2, bf16 = rows.values()
    assert ref["max_err_vs_fp32"] == 0 and ours["max_err_vs_fp32"] == 0  # float32 on the CPU: the same numbers
    assert 30.0 < bf16["psnr_vs_fp32"] < 200.0 and bf16["max_err_vs_fp32"] > 0
    assert ref["picture"]["std"] > 0.1  # a picture with range (calibrated weights)
    assert all(r["ms"] > 0 for r in rows.values())
    for r, b in ((b1, 1), (b2, 2)):
        assert r["kind"] == "batch" and r["b"] == b and r["fps"] > 0 and r["checked_frames"] == 2 * b
        assert r["within_tolerance"] and r["max_abs_diff_vs_single"] < 1e-4  # float32: rounding only
    assert "| row | B | ms per call | fps per GPU |" in res.stdout and "| reference | " in res.stdout
    assert "identical" in res.stdout  # the float32 rows' PSNR cell


def test_the_batch_check_catches_streams_that_differ(bench: ModuleType, pipe: StreamDiffVSR, one_thread: None
                                                     ) -> None:
    """measure_batch compares each stream with its own process_frame run: streams served in the wrong order
    must fail the check."""
    good = bench.measure_batch(pipe, 2, 2, 1, 32, 32, 2)
    assert good["within_tolerance"] and good["max_abs_diff_vs_single"] < 1e-4

    class Swapped:
        def __getattr__(self, name: str) -> Any:
            return getattr(pipe, name)

        def process_batch(self, lq: torch.Tensor, states: list[Any], noise: torch.Tensor) -> Any:
            hq, new = pipe.process_batch(lq, states, noise=noise)
            return hq.flip(0), new

    bad = bench.measure_batch(Swapped(), 2, 2, 1, 32, 32, 2)
    assert not bad["within_tolerance"] and bad["max_abs_diff_vs_single"] > 1e-2


def test_reference_path_embeds_the_condition_at_every_step_with_the_same_output(
        bench: ModuleType, tiny_ckpt: Path, one_thread: None) -> None:
    """The reference row executes like upstream (the ControlNet embeds inside every step): the same numbers."""
    load = bench.load_folder(tiny_ckpt)
    frames, noises = bench.make_frames(3, 32, 32)
    cpu = bench.reference_options("cpu")
    ref, ours = bench.build(load, cpu, upstream=True), bench.build(load, cpu)
    assert ref.components.cond_embedding is None and ours.components.cond_embedding is not None
    calls: list[int] = []
    ref.components.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *a: calls.append(1))
    a = bench.measure(ref, frames, noises, 1)["outs"]
    b = bench.measure(ours, frames, noises, 1)["outs"]
    assert len(calls) == 2 * 4  # two warm frames, four steps each
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_calibration_gives_the_picture_a_real_range(bench: ModuleType, tiny_ckpt: Path, one_thread: None) -> None:
    """Random weights decode to a nearly black frame, where a PSNR compares nothing: calibrate_random rescales
    the output layers to a mean of 0.5 and a spread of 0.2 (here on a darkened tiny model)."""
    load = bench.load_folder(tiny_ckpt)
    with torch.no_grad():
        load["vae"].decoder.layers[-1].bias.fill_(-3.0)  # the decoder's output far below 0: clamped black
    frames, noises = bench.make_frames(2, 32, 32)
    cpu = Options(device="cpu", prefetch_flow=False)

    def picture() -> dict[str, float]:
        return bench.picture_stats(bench.measure(bench.build(load, cpu), frames, noises, 1)["outs"])

    before = picture()
    assert before["clamped"] > 0.5, before
    bench.calibrate_random(load, 32, 32)
    after = picture()
    assert 0.35 < after["mean"] < 0.65 and 0.12 < after["std"] < 0.3 and after["clamped"] < 0.05, after


def test_fp8_linear_is_close_to_the_float_layer(bench: ModuleType) -> None:
    """The fp8 lever's layer: e4m3 operands with per-tensor scales, ~2 significant digits; where this torch or
    device cannot run it, the reason is one plain line."""
    reason = bench.fp8_unsupported(torch.device("cpu"))
    if reason is not None:  # a torch without float8 on the CPU: the row is skipped with this line
        assert "\n" not in reason and ("_scaled_mm" in reason or "float8" in reason)
        return
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(60, 48, bias=False))
    assert bench.to_fp8(model) == 1 and isinstance(model[0], bench.Fp8Linear)  # 60 is no multiple of 16
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want, got = layer(x), bench.Fp8Linear(layer)(x)
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < 0.08


# --------------------------------------------------------------------------------------------- reports

def test_saved_results_never_replace_history(bench: ModuleType, tmp_path: Path) -> None:
    data = dict(gpu="NVIDIA H200", lr=[320, 180], date="2026-12-04")
    first = bench.saved_path(data, tmp_path)
    assert first.name == "2026-12-04-nvidia-h200-320x180.json"
    first.write_text("{}")
    assert bench.saved_path(data, tmp_path).name == "2026-12-04-nvidia-h200-320x180-2.json"
    assert bench.saved_path(data, tmp_path, "levers").name == "2026-12-04-nvidia-h200-320x180-levers.json"


def test_tables_show_a_dash_for_what_was_not_measured(bench: ModuleType) -> None:
    """nan/inf are written to JSON as null; the tables show "-" for them, the same before and after."""
    row = dict(kind="frame", ms=90.0, first_ms=900.0, warmup_overhead_s=1.0, peak_gib=float("nan"),
               peak_steady_gib=float("nan"), psnr_vs_fp32=float("nan"), max_err_vs_fp32=float("nan"))
    back = json.loads(bench.dump(dict(r=row)))["r"]
    assert back["peak_gib"] is None
    for r in (row, back):
        assert "| x | 90.0 | 11.11 | 1.00x | 900 | 1.0 | - | - | - |" in bench.frame_table({"x": r}, "t")


# --------------------------------------------------------------------------------------------- device_bench

def test_device_bench_dry_run_runs_each_step_as_a_bench_process(tmp_path: Path) -> None:
    """The GPU driver end to end on the CPU: the weights first, a missing reference made before the step whose
    PSNR needs it, results.json and tables.md with the steps' rows, and the commands that reproduce them."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(SCRIPTS / "device_bench.py"), "--dry-run", "--budget-s", "900",
                          "--steps", "720p-warm,1080p-eager", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    data = json.loads((out / "results.json").read_text())
    steps = data["steps"]
    assert list(steps) == ["weights", "720p-warm", "1080p-ref", "1080p-eager"]
    assert all(s["status"] == "ok" for s in steps.values()), {n: s["status"] for n, s in steps.items()}
    assert data["dry_run"] and data["gpu"] == "CPU"
    assert "--rows" in steps["1080p-eager"]["cmd"] and "--lr" in steps["1080p-eager"]["cmd"]
    eager = steps["1080p-eager"]["results"]["rows"]
    assert list(eager) == ["Options(compile=False)", "Options(compile=False, channels_last=False)"]
    assert all(r["max_err_vs_fp32"] == 0 for r in eager.values())  # PSNR against 1080p-ref's saved outputs
    tables = (out / "tables.md").read_text()
    assert "| reference [1080p-ref] |" in tables and "## Compile time of the default path" in tables
    assert "| 720p-warm | ok |" in tables
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "tables.md"]


def test_device_bench_lists_what_does_not_fit_and_refuses_unknown_steps(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    device_bench = _script("device_bench")
    with pytest.raises(SystemExit) as exc:
        device_bench.main(["--dry-run", "--steps", "720p,nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown steps ['nope']" in err and err.count("\n") == 1
    device_bench.main(["--dry-run", "--budget-s", "0", "--steps", "720p,4K-default", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert {n: s["status"] for n, s in data["steps"].items()} == {"weights": "skipped"}
    assert "the weights could not be made: no step can run" in data["notes"]
    assert "| weights | skipped |" in (tmp_path / "tables.md").read_text()


def test_flops_counts_every_component_of_a_frame() -> None:
    """scripts/flops.py counts the full-size architecture on the meta device (shapes only, seconds)."""
    res = subprocess.run([sys.executable, str(SCRIPTS / "flops.py"), "--lr", "64x48"],
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


def test_the_plan_in_docs_names_every_step() -> None:
    """docs/performance.md's plan for the next GPU session lists every step the driver knows, with its arguments."""
    device_bench = _script("device_bench")
    text = (REPO / "docs" / "performance.md").read_text()
    plan = text[text.index("## Plan for the next GPU session"):]
    listed = device_bench.step_table(device_bench.steps())
    for name in device_bench.steps():
        if name in ("weights", "720p-ref", "1080p-ref"):  # made by the driver where a step needs them
            continue
        assert f"`{name}`" in plan, name
        args = next(line for line in listed.splitlines() if line.startswith(f"| {name} |")).split("`")[1]
        assert f"`{args}`" in plan, (name, args)


def test_the_compile_cache_goes_to_the_next_lease_in_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--save-cache packs the run's compile cache into at most MAX_PARTS files the device tool brings back, and
    --cache-in restores it; a cache too large for that is left out with a note, not cut short."""
    import argparse
    import os

    device_bench = _script("device_bench")
    monkeypatch.setattr(device_bench, "PART_BYTES", 1000)

    def driver(name: str, **kw: Any) -> Any:
        args = argparse.Namespace(dry_run=True, dry_compile=False, device="cpu", budget_s=60.0,
                                  out=str(tmp_path / name), scratch=str(tmp_path / f"scratch-{name}"), cache_in=None,
                                  save_cache=True)
        for k, v in kw.items():
            setattr(args, k, v)
        return device_bench.Driver(args)

    first = driver("a")
    blob = os.urandom(2500)  # incompressible: three parts of 1000 bytes
    (first.cache / "fxgraph").mkdir()
    (first.cache / "fxgraph" / "entry").write_bytes(blob)
    first.save_cache()
    parts = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert parts == ["compile-cache.tar.gz.0", "compile-cache.tar.gz.1", "compile-cache.tar.gz.2"]
    second = driver("b", cache_in=str(tmp_path / "a"))
    assert second.preloaded and (second.cache / "fxgraph" / "entry").read_bytes() == blob
    assert any("preloaded" in n for n in second.notes)
    (second.cache / "big").write_bytes(os.urandom(5000))
    second.save_cache()
    assert not list((tmp_path / "b").glob("compile-cache*")) and any("not saved" in n for n in second.notes)

#!/usr/bin/env python3
"""Issue 25's measurements as one budgeted run for a short GPU lease (see device_bench.sh and docs/performance.md).

Each step is one ``scripts/bench.py`` process (so every figure has a command line that reproduces it), run in
priority order, each bounded by the time left: a step whose minimum estimate no longer fits is skipped and
listed; a step cut short keeps the rows it finished (bench.py rewrites its JSON after every row). Weights are
drawn once into a scratch folder and read by every step; the reference outputs of each size are kept there
for the PSNR of later steps. All steps share one compile cache, empty at the start: a size's first compiled
step measures the cold compile, and a ``-warm`` step the same compile in a second process.

    python scripts/device_bench.py --out bench-out --budget-s 480            # on a CUDA machine
    python scripts/device_bench.py --dry-run --out /tmp/b                    # the whole driver on a CPU, tiny sizes

Writes to --out: results.json (every step's results, status and command), tables.md (the tables), and with
--save-cache the compile cache as compile-cache.tar.gz[.N] (at most 3 files of 15 MiB) for a later lease's
--cache-in. Progress goes to stdout; tables.md is printed last.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import batch_table, dump, finite, frame_table, write_atomic  # noqa: E402

BENCH = Path(__file__).with_name("bench.py")
SIZES = {"720p": (320, 180), "1080p": (480, 270), "4K": (960, 540)}
DRY_SIZES = {"720p": (40, 32), "1080p": (46, 34), "4K": (72, 56)}
#: seconds a bench.py process spends before its first row (interpreter, torch, weights from the scratch folder)
START_S = 15.0
#: the first compile of the default path at 720p with an empty cache (H100 runs 6-7: ~100 s for the denoising,
#: ~25 s for RAFT), until a step measures it; 1080p is taken as 1.3 times that
FIRST_COMPILE_S = 130.0
#: a compile served from the cache (run 6: 14-16 s in a second process), for the estimates
WARM_COMPILE_S = 25.0
PART_BYTES = 15 * 2**20  # the device tool brings back files of at most 16 MiB
MAX_PARTS = 3


@dataclass
class Step:
    """One bench.py process: its arguments, the size it measures, and what it should cost.

    ``min_s``/``full_s``: seconds for its first useful row and for all of it, given the first compile's time c
    (the step starts when ``min_s`` fits and is stopped when the budget ends); ``compile``: "cold" where it is
    this run's first compile of its path at its size, "warm" for the same compile in a second process, "batch"
    where each B compiles anew (new shapes: cold even with a preloaded cache);
    ``needs_ref``: its PSNR needs the size's reference outputs (a ``<size>-ref`` step is run first if no step
    of this run made them).
    """

    size: str
    args: Callable[["Driver"], list[str]]
    min_s: Callable[[float], float]
    full_s: Callable[[float], float]
    compile: str | None = None
    needs_ref: bool = False
    makes_ref: bool = False
    #: its "ours" rows are the default path (Options() on the device; a dry run's stand-in is --compile 1)
    default: bool = False
    doc: str = ""


def _lr(d: "Driver", size: str) -> list[str]:
    w, h = d.sizes[size]
    return ["--lr", f"{w}x{h}"]


def _default(d: "Driver") -> list[str]:
    """The default path: Options() as resolved on the device. A dry run stands in for CUDA's compiled default
    with --compile 1 (eager under TORCHDYNAMO_DISABLE unless --dry-compile)."""
    return ["--compile", "1"] if d.dry else []


def _tile(d: "Driver") -> str:
    return "32" if d.dry else "256"


def steps() -> dict[str, Step]:
    """Every step, by name (``--steps`` picks and orders them)."""
    s0 = START_S

    def frames(n: int, warm: int) -> Callable[["Driver"], list[str]]:
        """n frames, the first ``warm`` left out of the median; a dry run: 3 and 1, or 5 and 3 where it really
        compiles (the first warm frame compiles, the next ones record graphs)."""
        def args(d: "Driver") -> list[str]:
            if not d.dry:
                return ["--frames", str(n), "--warmup", str(warm)]
            return ["--frames", "5", "--warmup", "3"] if d.args.dry_compile else ["--frames", "3", "--warmup", "1"]
        return args

    out: dict[str, Step] = {
        "weights": Step("", lambda d: ["--prepare"], lambda c: 60, lambda c: 60,
                        doc="the weights (random full-size, calibrated; tiny in a dry run), into the scratch folder"),
    }
    for size, k in (("720p", 1.0), ("1080p", 1.3)):
        out[f"{size}-ref"] = Step(size, lambda d, z=size: _lr(d, z) + frames(24, 4)(d) + ["--rows", "reference"],
                                  lambda c, k=k: s0 + 15 * k, lambda c, k=k: s0 + 15 * k, makes_ref=True,
                                  doc="the reference alone (for the PSNR of later steps)")
    out["720p"] = Step("720p", lambda d: _lr(d, "720p") + frames(24, 4)(d) + _default(d) + [
        "--rows", "reference,ours", "--also", "compile=0", "--also", "compile=0", "channels_last=0"],
        lambda c: s0 + 15 + c, lambda c: s0 + 15 + c + 30, compile="cold", makes_ref=True, default=True,
        doc="(a) reference and default side by side, cold compile; eager with and without channels_last")
    out["1080p"] = Step("1080p", lambda d: _lr(d, "1080p") + frames(24, 4)(d) + _default(d) + [
        "--rows", "reference,ours"], lambda c: s0 + 25 + 1.3 * c, lambda c: s0 + 25 + 1.3 * c, compile="cold",
        makes_ref=True, default=True, doc="(a) reference and default side by side, cold compile")
    for size, k in (("720p", 1.0), ("1080p", 1.3)):
        out[f"{size}-warm"] = Step(size, lambda d, z=size: _lr(d, z) + frames(8, 4)(d) + _default(d) + [
            "--rows", "ours"], lambda c, k=k: s0 + 30 * k, lambda c, k=k: s0 + 30 * k, compile="warm", default=True,
            doc="(e) the default's compile again in a second process, cache warm")
        # B=1 first (the baseline), then the largest B (the likeliest best): a step cut short keeps those
        out[f"{size}-batch"] = Step(size, lambda d, z=size: _lr(d, z) + frames(10, 4)(d) + _default(d) + [
            "--rows", "ours,batch", "--batch", "1,8,4,2"], lambda c, k=k: s0 + 30 * k + k * c + 20,
            lambda c, k=k: s0 + 30 * k + 3 * k * c + 60 * k, compile="batch", default=True,
            doc="(b) the default's single stream, then process_batch B=1,8,4,2 on the same pipeline (one compile "
                "per B), each stream checked against its batch-1 run")
    out["720p-batch-eager"] = Step("720p", lambda d: _lr(d, "720p") + frames(8, 2)(d) + [
        "--compile", "0", "--rows", "ours,batch", "--batch", "1,8,4,2"], lambda c: s0 + 30, lambda c: s0 + 90,
        doc="(b) the same eager: no compile, how far batching alone fills the GPU")
    levers = {
        "720p-bf16": (["--dtype", "bfloat16", "--rows", "ours"], 1.0, "(c) bf16, compiled"),
        "720p-fp8": (["--rows", "fp8"], 1.0, "(c) fp8 matmuls (torch._scaled_mm), compiled"),
        "720p-frame-graph": (["--compile-mode", "default", "--rows", "ours,frame-graph"], 1.0,
                             "(c) compiled without CUDA graphs, then one CUDA graph per warm frame"),
        "720p-tuned": (["--inductor-preset", "tuned", "--rows", "ours"], 1.5,
                       "(c) inductor's conv_1x1_as_mm, coordinate descent, no epilogue fusion (CUDA graphs)"),
        "720p-max-autotune": (["--compile-mode", "max-autotune", "--inductor-preset", "tuned", "--rows", "ours"],
                              5.0, "(c) max-autotune templates with the tuned settings, cache cold"),
        "720p-max-autotune-warm": (["--compile-mode", "max-autotune", "--inductor-preset", "tuned", "--rows",
                                    "ours"], 1.6, "(c, e) the same in a second process: the persistent cache"),
    }
    for name, (extra, k, doc) in levers.items():
        cold = "warm" if name.endswith("-warm") else "cold"
        out[name] = Step("720p", lambda d, e=extra: _lr(d, "720p") + frames(24, 4)(d) + _default(d) + e,
                         lambda c, k=k: s0 + min(k, 2.0) * c + 10, lambda c, k=k: s0 + k * c + 10, compile=cold,
                         needs_ref=True, doc=doc)
    out["1080p-eager"] = Step("1080p", lambda d: _lr(d, "1080p") + frames(24, 4)(d) + [
        "--compile", "0", "--rows", "ours", "--also", "compile=0", "channels_last=0"], lambda c: s0 + 30,
        lambda c: s0 + 60, needs_ref=True, doc="(a) eager with and without channels_last")
    out["4K-ref"] = Step("4K", lambda d: _lr(d, "4K") + frames(6, 2)(d) + [
        "--rows", "reference", "--reference-options", "raft_corr=lean"], lambda c: s0 + 60, lambda c: s0 + 60,
        makes_ref=True, doc="(d) float32 reference with the lean correlation (the same flow; the full pyramid "
                            "alone would need 89 GB)")
    out["4K-eager"] = Step("4K", lambda d: _lr(d, "4K") + frames(6, 2)(d) + [
        "--compile", "0", "--rows", "ours", "--also", "compile=0", f"tile={_tile(d)}", "--also", "compile=0",
        "raft_corr=half"] + ([] if d.dry else ["--also", "compile=0", "flow=lr"]),  # RAFT at LR needs 128 px
        lambda c: s0 + 45, lambda c: s0 + 200,
        needs_ref=True, doc="(d) eager: whole frames, tiled, the float16 pyramid (44 GB), RAFT at LR (deviation)")
    out["4K-default"] = Step("4K", lambda d: _lr(d, "4K") + frames(6, 2)(d) + _default(d) + ["--rows", "ours"],
                             lambda c: s0 + 2 * c + 30, lambda c: s0 + 2 * c + 40, compile="cold", needs_ref=True,
                             default=True, doc="(a, d) the default at 4K (compiled, whole frames where they fit)")
    return out


DEFAULT_STEPS = ("720p,1080p,720p-warm,1080p-warm,720p-batch,720p-bf16,720p-fp8,720p-frame-graph,720p-tuned,"
                 "720p-batch-eager,1080p-eager,4K-ref,4K-eager,1080p-batch,4K-default,720p-max-autotune,"
                 "720p-max-autotune-warm")


@dataclass
class Outcome:
    status: str  # ok, failed (rows failed), error (no results), timeout, skipped
    default: bool = False
    compile: str | None = None
    wall_s: float = 0.0
    cmd: list[str] = field(default_factory=list)
    rc: int | None = None
    data: dict[str, Any] | None = None
    note: str = ""


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = bool(args.dry_run)
        self.device = "cpu" if self.dry else args.device
        self.sizes = DRY_SIZES if self.dry else SIZES
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="vsdvsr-bench-"))
        self.own_scratch = not args.scratch
        self.cache = self.scratch / "compile-cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.first_compile = 5.0 if self.dry else FIRST_COMPILE_S
        self.outcomes: dict[str, Outcome] = {}
        self.refs: set[str] = set()
        self.notes: list[str] = []
        self.preloaded = self.load_cache(Path(args.cache_in)) if args.cache_in else False
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    # -- time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    # -- one step
    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(self.cache),
                   TRITON_CACHE_DIR=str(self.cache / "triton"))
        if self.dry and not self.args.dry_compile:
            env["TORCHDYNAMO_DISABLE"] = "1"  # the compile code paths run, torch.compile returns the function
        return env

    def command(self, name: str, step: Step) -> list[str]:
        cmd = [sys.executable, str(BENCH), "--device", self.device, "--scratch", str(self.scratch),
               "--compile-cache-dir", str(self.cache), "--json", str(self.scratch / f"{name}.json"), "--step", name,
               "--debug"]
        if self.dry:
            cmd.append("--tiny")
        return cmd + step.args(self)

    def estimate(self, step: Step) -> tuple[float, float]:
        if self.dry:
            return (5.0, 20.0) if step.size == "" else (20.0, 60.0)
        cold = step.compile == "batch" or (step.compile == "cold" and not self.preloaded)
        c = self.first_compile if cold else WARM_COMPILE_S
        return step.min_s(c), step.full_s(c)

    def run_step(self, name: str, step: Step) -> None:
        lo, hi = self.estimate(step)
        left = self.left()
        if lo > left:
            self.outcomes[name] = Outcome("skipped", note=f"needs ~{lo:.0f} s, {left:.0f} s left")
            self.log(f"skipped: {name} (needs ~{lo:.0f} s, {left:.0f} s left)")
            self.save()
            return
        cmd = self.command(name, step)
        self.log(f"== {name} (estimate {lo:.0f}-{hi:.0f} s, {left:.0f} s left): {step.doc}")
        self.log("$ " + " ".join(cmd))
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env(), start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, left))
            status = {0: "ok", 1: "failed"}.get(rc, "error")  # 1: some rows failed; 2: refused; <0: a signal
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group: bench.py and its compile workers
            proc.wait()
            rc, status = None, "timeout"
        wall = time.perf_counter() - t
        path = self.scratch / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else None
        if data is None and status != "timeout":
            status = "error"
        outcome = Outcome(status, step.default, step.compile, round(wall, 1), cmd, rc, data)
        if status == "timeout":
            outcome.note = f"stopped at the budget after {wall:.0f} s; rows finished before are kept"
        elif rc is not None and rc < 0:
            outcome.note = (f"killed by signal {-rc}" + (" after writing all its rows" if data and data.get("complete")
                                                         else "; rows finished before are kept"))
        self.outcomes[name] = outcome
        self.learn(step, data)
        if step.makes_ref and data and any(r.get("role") == "reference" for r in data["rows"].values()):
            self.refs.add(step.size)
        self.log(f"{name}: {status} in {wall:.0f} s" + (f" (exit {rc})" if rc not in (0, None) else ""))
        self.save()

    def learn(self, step: Step, data: dict[str, Any] | None) -> None:
        """The first compile's time (as at 720p), from a cold step's default row."""
        if step.compile != "cold" or self.preloaded or not data:
            return
        for r in data["rows"].values():
            if r.get("role") == "ours" and step.default and r.get("warmup_overhead_s") is not None:
                scale = {"1080p": 1.3, "4K": 2.0}.get(step.size, 1.0)
                self.first_compile = max(1.0, r["warmup_overhead_s"] / scale)
                return

    def run(self, names: list[str]) -> None:
        """The weights first, then ``names`` in order; a step whose PSNR needs a size's reference outputs gets
        that size's ``-ref`` step first where no earlier step made them."""
        table = steps()
        for name in ["weights"] + [n for n in names if n != "weights"]:
            if name in self.outcomes:
                continue
            step = table[name]
            if step.needs_ref and step.size not in self.refs and f"{step.size}-ref" not in self.outcomes:
                self.run_step(f"{step.size}-ref", table[f"{step.size}-ref"])
            if name == "weights" and (self.scratch / "weights" / "meta.json").exists():
                self.outcomes[name] = Outcome("ok", note="weights already in the scratch folder")
                continue
            self.run_step(name, step)
            if name == "weights" and self.outcomes[name].status != "ok":
                self.notes.append("the weights could not be made: no step can run")
                break

    # -- the compile cache between leases
    def load_cache(self, folder: Path) -> bool:
        parts = sorted(folder.glob("compile-cache.tar.gz*"), key=lambda p: (len(p.name), p.name))
        if not parts:
            self.notes.append(f"--cache-in {folder}: no compile-cache.tar.gz there; the cache starts empty")
            return False
        joined = self.scratch / "cache-in.tar.gz"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        with tarfile.open(joined, "r:gz") as tar:
            tar.extractall(self.cache, filter="data")
        joined.unlink()
        self.notes.append(f"compile cache preloaded from {folder} ({len(parts)} file(s)): compile times of this run "
                          "are warm-cache figures, and 'cold' steps are not cold")
        return True

    def save_cache(self) -> None:
        packed = self.scratch / "compile-cache.tar.gz"
        with tarfile.open(packed, "w:gz", compresslevel=1) as tar:  # seconds, not a minute, for ~100 MB
            tar.add(self.cache, arcname=".")
        size = packed.stat().st_size
        if size > MAX_PARTS * PART_BYTES:
            self.notes.append(f"compile cache not saved: {size / 2**20:.0f} MiB packed, more than {MAX_PARTS} files "
                              f"of {PART_BYTES // 2**20} MiB")
            packed.unlink()
            return
        for old in self.out.glob("compile-cache.tar.gz*"):
            old.unlink()
        with open(packed, "rb") as f:
            if size <= PART_BYTES:
                (self.out / "compile-cache.tar.gz").write_bytes(f.read())
            else:
                for i in range(math.ceil(size / PART_BYTES)):
                    (self.out / f"compile-cache.tar.gz.{i}").write_bytes(f.read(PART_BYTES))
        packed.unlink()
        self.notes.append(f"compile cache saved to {self.out} ({size / 2**20:.1f} MiB packed)")

    # -- results
    def results(self) -> dict[str, Any]:
        first = next((o.data for o in self.outcomes.values() if o.data), None) or {}
        return dict(schema="vsstreamdiffvsr-device-bench/2", started=self.started, dry_run=self.dry,
                    budget_s=self.args.budget_s, elapsed_s=round(self.elapsed(), 1), gpu=first.get("gpu"),
                    torch=first.get("torch"), diffusers=first.get("diffusers"), weights=first.get("weights"),
                    commit=_commit(), cache_preloaded=self.preloaded, notes=self.notes,
                    steps={n: dict(status=o.status, wall_s=o.wall_s, rc=o.rc, note=o.note, default_path=o.default,
                                   compile=o.compile, cmd=o.cmd[1:], results=o.data) for n, o in self.outcomes.items()})

    def save(self) -> None:
        data = self.results()
        write_atomic(self.out / "results.json", dump(data))
        write_atomic(self.out / "tables.md", tables(data) + "\n")


def step_table(known: dict[str, Step]) -> str:
    """Every step: name, estimated seconds on an H100/H200 with an empty cache (first useful row - all of it),
    what it measures and its bench.py arguments (beside the scratch, cache and JSON ones the driver adds)."""

    class Sizes:  # what the step arguments read from a driver
        dry = False
        sizes = SIZES

    lines = ["| step | seconds | measures | bench.py arguments |", "|---|---|---|---|"]
    for name, step in known.items():
        c = FIRST_COMPILE_S if step.compile in ("cold", "batch") else WARM_COMPILE_S
        args = " ".join(step.args(Sizes()))  # type: ignore[arg-type]
        lines.append(f"| {name} | {step.min_s(c):.0f}-{step.full_s(c):.0f} | {step.doc} | `{args}` |")
    return "\n".join(lines)


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1], check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def tables(data: dict[str, Any]) -> str:
    """tables.md: per size the single-frame rows of every step (the step named beside each row), the batched
    rows, the compile times, then each step's status and notes."""
    data = finite(data)
    head = (f"# {data.get('gpu') or 'no GPU result yet'}, torch {data.get('torch')}, "
            f"diffusers {data.get('diffusers')}, "
            f"{data.get('weights')} weights, commit {data.get('commit')}, started {data['started']}"
            + (" (DRY RUN: CPU, tiny model)" if data.get("dry_run") else ""))
    parts = [head]
    by_size: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, s in data["steps"].items():
        if s.get("results") and s["results"].get("rows"):
            lr = "x".join(map(str, s["results"]["lr"]))
            by_size.setdefault(lr, []).append((name, s["results"]))
    default_steps = {n for n, s in data["steps"].items() if s.get("default_path")}
    compile_rows = []
    for lr, runs in by_size.items():
        w, h = map(int, lr.split("x"))
        single: dict[str, dict[str, Any]] = {}
        batched: dict[str, dict[str, Any]] = {}
        for step, res in runs:
            for row, r in res["rows"].items():
                key = f"{row} [{step}]" + (" (the default path)" if step in default_steps and
                                           r.get("role") == "ours" and data.get("dry_run") else "")
                (batched if r.get("kind") == "batch" else single)[key] = r | {"default_path": step in default_steps}
                if r.get("role") == "ours" and step in default_steps:
                    compile_rows.append((lr, step, r, res))
        title = f"## {w}x{h} -> {4 * w}x{4 * h}: single stream (rows from several processes; [step])"
        if single:
            ref = next((k for k, r in single.items() if r.get("role") == "reference"), None)
            ordered = {ref: single[ref]} | single if ref else single
            parts.append(frame_table(ordered, title))
        if batched:
            default = next((r for r in single.values() if r.get("role") == "ours" and r["default_path"]
                            and r.get("ms")), None)
            parts.append(batch_table(batched, f"## {w}x{h} -> {4 * w}x{4 * h}: B streams per call (process_batch)",
                                     1000 / default["ms"] if default else None))
        seen: set[str] = set()
        notes = []
        for k, r in single.items():  # what each row ran, once per row name (batched rows run the default's)
            base = k.split(" [")[0]
            if r.get("resolved") and base not in seen:
                seen.add(base)
                notes.append(f"- {base}: {r['resolved']}")
        notes += [f"- {k}: fallbacks {r['fallbacks']}" for k, r in {**single, **batched}.items() if r.get("fallbacks")]
        notes += [f"- {k}: {w}" for k, r in {**single, **batched}.items() for w in r.get("warnings") or []]
        on_gpu = data.get("gpu") not in (None, "CPU")
        notes += [f"- {k}: CUDA graphs skipped {r['compile_counts']['cudagraph_skips']} time(s): the row ran without "
                  "them" for k, r in {**single, **batched}.items()
                  if on_gpu and (r.get("compile_counts") or {}).get("cudagraph_skips")
                  and any(m in (r.get("resolved") or "") for m in ("(reduce-overhead)", "(max-autotune)"))]
        if notes:
            parts.append("\n".join(notes))
    if compile_rows:
        lines = ["## Compile time of the default path (warm-up frames above the steady median; the process from "
                 "its start)", "| size | step | cache | warm-up overhead s | warm-up frames s | process s at the row's "
                 "end | ms/frame |", "|---|---|---|---|---|---|---|"]
        for lr, step, r, _res in compile_rows:
            kind = {"cold": "cold (this size's first compile in the run)", "warm": "warm (a second process)"}.get(
                data["steps"][step].get("compile"), "as earlier steps left it")
            if data.get("cache_preloaded"):
                kind = f"preloaded from an earlier lease; {kind}"
            if not _compiled(r):
                kind = "eager (no compile)"
            lines.append(f"| {lr} | {step} | {kind} | {_f(r.get('warmup_overhead_s'))} | {_f(r.get('to_steady_s'))} "
                         f"| {_f(r.get('process_s'))} | {_f(r.get('ms'))} |")
        parts.append("\n".join(lines))
    status = ["## Steps", "| step | status | wall s | note |", "|---|---|---|---|"]
    for name, s in data["steps"].items():
        notes = "; ".join(filter(None, [s.get("note")] + ((s.get("results") or {}).get("notes") or [])))
        status.append(f"| {name} | {s['status']} | {_f(s.get('wall_s'))} | {notes} |")
    parts.append("\n".join(status))
    if data.get("notes"):
        parts.append("\n".join(f"- {n}" for n in data["notes"]))
    return "\n\n".join(parts)


def _compiled(row: dict[str, Any]) -> bool:
    return "compiled" in (row.get("resolved") or "")


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model and sizes, 3 frames: the driver end to end")
    ap.add_argument("--dry-compile", action="store_true",
                    help="with --dry-run: really compile (inductor on the CPU, minutes per compile)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="no step starts, and a running one is stopped, after this many seconds (default %(default)s)")
    ap.add_argument("--steps", default=DEFAULT_STEPS, help="comma-separated steps in priority order (default: "
                                                           "%(default)s)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--scratch", help="folder for weights, reference outputs and the compile cache (default: a new "
                                      "temporary folder, removed at the end)")
    ap.add_argument("--cache-in", help="a folder with compile-cache.tar.gz[.N] from an earlier run's --save-cache")
    ap.add_argument("--save-cache", action="store_true", help="write the compile cache to --out at the end")
    ap.add_argument("--list", action="store_true", help="print every step as a markdown table (name, seconds, what "
                                                         "it measures, its bench.py arguments) and exit")
    args = ap.parse_args(argv)
    known = steps()
    if args.list:
        print(step_table(known))
        return
    names = [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        ap.exit(2, f"device_bench.py: error: unknown steps {unknown}; known: {', '.join(known)}\n")
    d = Driver(args)
    d.log(f"device_bench: {len(names)} steps, budget {args.budget_s:.0f} s, scratch {d.scratch}"
          + (", DRY RUN (CPU, tiny)" if d.dry else ""))
    try:
        d.run(names)
        if args.save_cache:
            d.save_cache()
    finally:
        d.save()
        if d.own_scratch:
            shutil.rmtree(d.scratch, ignore_errors=True)
    d.log("done")
    print((d.out / "tables.md").read_text(), flush=True)


if __name__ == "__main__":
    main()

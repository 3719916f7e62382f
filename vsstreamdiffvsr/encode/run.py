"""One encode from start to end: check everything up front, plan (or take the plan kept in the work folder), run
the chunks on the workers, join the segments into OUTPUT.

Nothing is computed before the input, the output folder, ffmpeg, the encoder settings and the model folder have
been checked; a work folder made for another source or other settings is refused (never mixed); a finished
part is never computed again; OUTPUT appears, complete, only at the very end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import DISK_FULL, FAILED, INTERRUPTED, MISMATCH, EncodeError, disk_full_error
from .manifest import WorkDir
from .plan import Plan, describe_changes, estimate_ms_per_frame, fingerprint, make_chunks
from .scheduler import Events, Policy, drive
from .source import SourceInfo, describe, input_kind, open_clip, probe_input, source_identity

__all__ = ["EncodeArgs", "encode"]


@dataclass(frozen=True)
class EncodeArgs:
    """The command line, parsed (see ``vsstreamdiffvsr encode --help``)."""

    input: Path
    output: Path
    model_dir: str | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    workers: int | None = None
    ray_address: str | None = None
    work_dir: Path | None = None
    max_chunk: int = 2400
    warmup: int = 16
    part_frames: int = 240
    encoder_args: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    fps: tuple[int, int] | None = None
    streams_from: Path | None = None
    scene_threshold: float = 27.0
    min_scene_len: int = 15
    keep_work: bool = False
    cpu_threads: int | None = None


def _check_output(args: EncodeArgs) -> None:
    out = args.output
    if not out.suffix:
        raise EncodeError(f"output {out} has no extension; name the container, e.g. {out.name}.mkv")
    if out.exists() and out.is_dir():
        raise EncodeError(f"output {out} is a folder; give a file name such as {out / 'film-4x.mkv'}")
    if out.exists() and not args.overwrite and not args.dry_run:
        raise EncodeError(f"output {out} exists; pass --overwrite to replace it")
    if out.exists() and out.resolve() == args.input.resolve():
        raise EncodeError("output and input are the same file; choose another output name")
    folder = out.parent
    if not folder.exists():
        raise EncodeError(f"output folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise EncodeError(f"output folder {folder} is not a folder")
    probe = folder / f".vsstreamdiffvsr-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        full = disk_full_error(exc, str(folder))
        if full is not None:
            raise full from None
        raise EncodeError(f"output folder {folder} is not writable ({exc.strerror}); choose another output") \
            from None


def _model_identity(root: Path) -> str:
    """sha256 over the model folder's files: names and sizes, small files whole, large ones by their first and
    last MiB (the weights' headers and tails). The empty-prompt cache is left out: the first load writes it, from
    the text encoder, which is counted."""
    from vsstreamdiffvsr.weights.layout import PROMPT_CACHE_NAME

    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel or rel.endswith(".tmp") or rel.startswith(PROMPT_CACHE_NAME):
            continue
        size = path.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 2 << 20:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return digest.hexdigest()


def _resolve_model(model_dir: str | None) -> Path:
    from vsstreamdiffvsr.weights import ModelFilesError, validate_model_dir

    try:
        return validate_model_dir(model_dir)
    except (ModelFilesError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or ["the model folder is not usable"])[0]
        raise EncodeError(f"{first}; fill it with: python -m vsstreamdiffvsr download") from None


def _device(args: EncodeArgs) -> str:
    if args.device is not None:
        if args.device not in ("cuda", "cpu"):
            raise EncodeError(f"--device must be cuda or cpu, got {args.device!r}")
        return args.device
    if args.ray_address:
        return "cuda"
    import torch

    if not torch.cuda.is_available():
        raise EncodeError("CUDA is not available here; pass --device cpu to run on the CPU (very slow)")
    return "cuda"


def _dtype(args: EncodeArgs, device: str) -> str:
    from vsstreamdiffvsr.options import dtype_name, parse_dtype

    if args.dtype is None:
        return "float16" if device == "cuda" else "float32"
    try:
        return dtype_name(parse_dtype(args.dtype))
    except ValueError:
        raise EncodeError(f"--dtype must be float32, float16 or bfloat16, got {args.dtype!r}") from None


class _Source:
    """The opened input: what the plan, the workers and the mux need."""

    def __init__(self, args: EncodeArgs) -> None:
        from vsstreamdiffvsr import __version__  # noqa: F401  (the package is importable)

        self.kind = input_kind(args.input)
        if self.kind == "vpy":
            if not args.input.is_file():
                raise EncodeError(f"input {args.input} does not exist")
            if args.fps is not None:
                raise EncodeError("--fps converts a video file's frame rate; in a .vpy use core.std.AssumeFPS or a "
                                  "frame-rate converter")
            streams = args.streams_from
            probe = probe_input(streams) if streams is not None else {}
        else:
            probe = probe_input(args.input, check_rate=args.fps is None)  # --fps: bestsource makes it constant
            streams = args.input
        self.probe = probe
        self.clip, self.matrix = open_clip(args.input, self.kind, args.fps)
        field_based = int(self.clip.get_frame(0).props.get("_FieldBased", 0))
        if field_based in (1, 2):
            from .source import INTERLACED_FIX

            fix = ("deinterlace it in the script, or core.std.SetFieldBased(clip, 0) if it is progressive"
                   if self.kind == "vpy" else INTERLACED_FIX)
            raise EncodeError(f"input {args.input} is interlaced (_FieldBased={field_based}); {fix}")
        self.info: SourceInfo = describe(args.input, self.kind, self.clip, self.matrix, probe, streams)


def _settings(args: EncodeArgs, device: str, dtype: str, model: str, encoder: list[str]) -> dict[str, Any]:
    from vsstreamdiffvsr import __version__

    return {"seed": args.seed, "max_chunk": args.max_chunk, "warmup": args.warmup, "part_frames": args.part_frames,
            "scene_threshold": args.scene_threshold, "min_scene_len": args.min_scene_len, "device": device,
            "dtype": dtype, "model": model, "encoder": encoder, "fps": list(args.fps) if args.fps else None,
            "package": __version__}


def _detect(src: _Source, args: EncodeArgs, err: IO[str]) -> list[int]:
    from .scenes import detect_scene_cuts

    total = src.clip.num_frames
    tty = err.isatty()
    if tty:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc="scene cuts", file=err, dynamic_ncols=True)
        last = [0]

        def on_frame(n: int) -> None:
            bar.update(n - last[0])
            last[0] = n
    else:
        print(f"encode: finding scene cuts in {total} frames", file=err, flush=True)
        bar = None

        def on_frame(n: int) -> None:
            return None
    try:
        return detect_scene_cuts(src.clip, args.scene_threshold, args.min_scene_len, on_frame)
    finally:
        if bar is not None:
            bar.close()


def _print_plan(plan: Plan, info: SourceInfo, args: EncodeArgs, work: Path, out: IO[str]) -> None:
    fps = info.fps[0] / info.fps[1]
    seconds = plan.total_frames / fps
    ms, basis = estimate_ms_per_frame(info.width, info.height)
    compute = plan.compute_frames
    hours = compute * ms / 3.6e6
    longest = max(plan.chunks, key=lambda c: c.compute_frames)
    workers = args.workers or 1
    w = print
    w(f"input: {args.input}", file=out)
    w(f"output: {args.output}", file=out)
    w(f"work folder: {work}", file=out)
    w(f"source: {info.width}x{info.height} -> {4 * info.width}x{4 * info.height}, {plan.total_frames} frames at "
      f"{info.fps[0]}/{info.fps[1]} fps ({int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:"
      f"{int(seconds % 60):02d}), {len(plan.cuts) + 1} scenes", file=out)
    s = plan.settings
    w(f"settings: seed {s['seed']}, device {s['device']} {s['dtype']}, max-chunk {s['max_chunk']}, warmup "
      f"{s['warmup']}, part-frames {s['part_frames']}, encoder {shlex.join(s['encoder'])}", file=out)
    w(f"plan: {len(plan.chunks)} chunks, {plan.parts} parts, {compute} frames to compute "
      f"({compute - plan.total_frames} warm-up), longest chunk #{longest.index} with {longest.compute_frames} "
      "frames", file=out)
    per_worker = max(hours / workers, longest.compute_frames * ms / 3.6e6)
    w(f"estimate: {hours:.2f} GPU-hours at {ms:.1f} ms per frame ({basis}); about {per_worker:.2f} h with "
      f"{workers} worker(s)", file=out)
    w("chunk\tfirst\tlast\tscenes\tparts\twarm-up", file=out)
    for c in plan.chunks:
        w(f"{c.index}\t{c.start}\t{c.end - 1}\t{len(c.cuts) + 1}\t{len(c.parts)}\t{c.start - c.compute_start}",
          file=out)


def encode(args: EncodeArgs, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run one encode; returns the exit code (0 done). Every failure is one line on ``err`` (module docstring)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    held: list[WorkDir] = []
    try:
        _prepare_and_run(args, out, err, held)
        return 0
    except EncodeError as exc:
        print(f"vsstreamdiffvsr encode: {exc}", file=err, flush=True)
        return exc.code
    except KeyboardInterrupt:
        print("vsstreamdiffvsr encode: interrupted; finished parts are kept: rerun the same command to resume",
              file=err, flush=True)
        return INTERRUPTED
    except OSError as exc:
        full = disk_full_error(exc, "the work folder or output")
        print(f"vsstreamdiffvsr encode: {full or f'{exc.strerror or exc}'}", file=err, flush=True)
        return DISK_FULL if full else FAILED
    finally:
        for work in held:
            work.close()


def _prepare_and_run(args: EncodeArgs, out: IO[str], err: IO[str], held: list[WorkDir]) -> None:
    from .mux import check_encoder, colour_args, default_encoder_args, parse_encoder_args, tool

    for name, value, low in (("--max-chunk", args.max_chunk, 1), ("--warmup", args.warmup, 0),
                             ("--part-frames", args.part_frames, 1), ("--min-scene-len", args.min_scene_len, 1)):
        if value < low:
            raise EncodeError(f"{name} must be at least {low}, got {value}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise EncodeError(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
    if args.workers is not None and args.workers < 1:
        raise EncodeError(f"--workers must be at least 1, got {args.workers}")
    if not args.scene_threshold > 0:
        raise EncodeError(f"--scene-threshold must be > 0, got {args.scene_threshold}")
    tool("ffmpeg"), tool("ffprobe")
    if not args.input.exists():
        raise EncodeError(f"input {args.input} does not exist")
    _check_output(args)
    device = _device(args)
    dtype = _dtype(args, device)
    src = _Source(args)
    info = src.info
    if args.encoder_args is not None:
        encoder = parse_encoder_args(args.encoder_args)
    else:
        encoder, warning = default_encoder_args()
        if warning:
            print(f"vsstreamdiffvsr encode: {warning}", file=err, flush=True)
    colour = colour_args(info.matrix, info.primaries, info.transfer)
    check_encoder(encoder, 4 * info.width, 4 * info.height, info.fps, info.sar, colour, args.output.suffix.lower(),
                  Path(info.streams_from) if info.streams_from else None, src.probe)
    model_root = _resolve_model(args.model_dir)
    settings = _settings(args, device, dtype, _model_identity(model_root), encoder)
    ident = source_identity(args.input, src.kind, src.clip)
    fp = fingerprint(ident, settings)

    work_path = args.work_dir or args.output.with_name(args.output.name + ".work")
    work = WorkDir(work_path).open()
    held.append(work)
    plan = work.read_plan()
    if plan is not None and plan.fingerprint != fp:
        raise EncodeError(f"the work folder {work_path} belongs to an encode of another source or other settings "
                          f"(changed: {describe_changes(plan, ident, settings)}); remove it (rm -r '{work_path}') "
                          "or pass another --work-dir", MISMATCH)
    if args.dry_run:
        if plan is None:
            plan = _make_plan(args, src, ident, settings, fp, err)
            work.write_plan(plan)
        _print_plan(plan, info, args, work_path, out)
        out.flush()
        return

    from .pool import WorkerPool
    from .worker import JobSpec

    spec = JobSpec(info.width, info.height, info.fps, info.sar, info.matrix, info.sample, args.seed, tuple(colour),
                   tuple(encoder))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGTERM, _sigterm)  # a polite kill stops like Ctrl-C: the work folder stays consistent
    pool: WorkerPool | None = None
    try:
        if plan is None or not _all_finished(plan, work):
            # the workers load their models and warm up while the cut list is found
            pool = WorkerPool.start(workers=args.workers, ray_address=args.ray_address, device=device, dtype=dtype,
                                    model_dir=args.model_dir, cpu_threads=args.cpu_threads, spec=spec,
                                    source=(str(args.input), src.kind, args.fps), clip=src.clip)
        if plan is None:
            plan = _make_plan(args, src, ident, settings, fp, err)
            work.write_plan(plan)
        if pool is not None:
            _run_chunks(plan, work, pool, err)
    finally:
        if pool is not None:
            pool.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    segments = [(work.segment_path(c.index, p.index), p.frames) for c in plan.chunks for p in c.parts]
    from .mux import join_segments

    streams = Path(info.streams_from) if info.streams_from else None
    warnings = join_segments(segments, info.fps, args.output, colour=colour, streams_from=streams, probe=src.probe,
                             video_start=info.video_start if src.kind == "file" else 0.0, list_dir=work_path)
    for line in warnings:
        print(f"vsstreamdiffvsr encode: {line}", file=err, flush=True)
    if not args.keep_work:
        work.remove()
    print(f"vsstreamdiffvsr encode: wrote {args.output} ({plan.total_frames} frames, {4 * info.width}x"
          f"{4 * info.height})", file=err, flush=True)


def _make_plan(args: EncodeArgs, src: _Source, ident: dict[str, Any], settings: dict[str, Any], fp: str,
               err: IO[str]) -> Plan:
    info = src.info
    cuts = _detect(src, args, err)
    chunks = make_chunks(info.num_frames, cuts, max_chunk=args.max_chunk, warmup=args.warmup,
                         part_frames=args.part_frames)
    return Plan(fp, ident, settings, info.num_frames, tuple(cuts), chunks,
                info={k: v for k, v in dataclasses.asdict(info).items() if k != "probe"})


def _finished(plan: Plan, work: WorkDir) -> set[tuple[int, int]]:
    return {k for k in work.finished() if k[0] < len(plan.chunks) and k[1] < len(plan.chunks[k[0]].parts)}


def _all_finished(plan: Plan, work: WorkDir) -> bool:
    return len(_finished(plan, work)) == plan.parts


def _run_chunks(plan: Plan, work: WorkDir, pool: Any, err: IO[str]) -> None:
    from .progress import Display

    finished = _finished(plan, work)
    policy = Policy(plan.chunks, finished)
    if policy.all_done:
        return
    events = Events()
    slots = pool.slots(events)
    done = sum(plan.chunks[c].parts[p].frames for c, p in finished)
    progress = Display(plan.total_frames, done, [s.name for s in slots], stream=err)

    def on_part(slot: Any, result: Any) -> None:
        work.save_part(result.chunk, result.part, result.segment, result.state,
                       {"frames": result.frames, "seconds": round(result.seconds, 3), "worker": result.worker})
        progress.chunk(slot.name, f"chunk {result.chunk} part {result.part + 1}/{len(plan.chunks[result.chunk].parts)}"
                                  f" done, {len(policy.done) + 1}/{plan.parts} parts")

    try:
        drive(policy, slots, events, state_of=work.state, on_part=on_part,
              on_progress=lambda slot, n: progress.frames(slot.name, n), on_idle=progress.tick)
    finally:
        for slot in slots:
            slot.stop()
        progress.close()
        if pool.cluster is None:  # the in-process worker ends its frame and kills its ffmpeg; Ray's actors are
            for slot in slots:    # killed by pool.close()
                slot.join(timeout=60)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

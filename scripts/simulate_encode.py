"""How `vsstreamdiffvsr encode` scales from 1 to 256 GPUs on a two-hour film: the real planner
(``vsstreamdiffvsr.encode.plan.make_chunks``) and the real scheduling policy
(``vsstreamdiffvsr.encode.scheduler.Policy``, longest chunk first) driven by simulated workers with measured
per-frame costs.

    python scripts/simulate_encode.py                     # the table of docs/encode.md (film-like cut list)
    python scripts/simulate_encode.py --video film.mkv    # the cut list PySceneDetect finds in a real video
    python scripts/simulate_encode.py --size 720p --asl 9 --max-chunk 600

The cut list (without --video) is drawn from shot-length statistics: shot lengths in feature films follow a
lognormal distribution whose standard deviation is about 1.2 times its mean (Barry Salt, "Moving Into Pictures",
2006, and "The Statistical Style Analysis of Motion Pictures", Film Quarterly 28(1), 1974); the average shot length
of popular English-language films fell to about 4 s by the 2000s (Cutting, DeLong & Nothelfer, "Attention and the
Evolution of Hollywood Film", Psychological Science 21(3), 2010; Salt gives about 4 s now, about 9 s in the 1940s).

Costs, each with its source (docs/encode.md lists them):

* per frame: 191.3 ms at 1080p out, 93.9 ms at 720p out, one H100, torch.compile (docs/bench run 7);
* per worker, once: the compile warm-up, 148.0 s at 1080p, 97.1 s at 720p (docs/bench run 7, cold kernel cache),
  run while the driver detects the cuts;
* per chunk: a reader seek and the first batch, ``--chunk-overhead`` s (measured on a 2-core VM: 0.04 s for a
  seek plus 8 frames of 480x272 H.264, 0.29 s at 1920x1080; 0.5 s assumed, for Ray's round trips and ffmpeg's
  start besides);
* per part: the encoder's drain of its look-ahead and the state's trip to the driver, ``--part-overhead`` s
  (assumed 1 s; not measured on a GPU machine);
* serial: scene detection over the whole film before any chunk starts, at ``--detect-fps`` (measured on a
  2-core VM: 590 fps at 480x272, 140 fps at 1920x1080; segments run in parallel on a machine with more cores,
  not counted here), the join of the segments at the end (``--join-seconds``, assumed 15 s: a copy of ~7 GB),
  Ray's start (``--ray-seconds``, 10 s; about 7 s measured here);
* the source readers: ``--reader-fps`` frames per second per reader (measured on the 2-core VM: 695 fps at
  480x272), ``min(4, workers // 8)`` readers, shared by all workers.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsstreamdiffvsr.encode.plan import make_chunks  # noqa: E402  (the real planner)
from vsstreamdiffvsr.encode.scheduler import Policy  # noqa: E402  (the real policy)

SIZES = {"1080p": (191.3, 148.0), "720p": (93.9, 97.1)}  # ms per frame, warm-up s: docs/bench run 7 (H100)


def film_cuts(frames: int, fps: float, asl: float, sd_ratio: float, seed: int) -> list[int]:
    """Scene starts of a film of ``frames`` frames: lognormal shot lengths of mean ``asl`` seconds and standard
    deviation ``sd_ratio * asl``, at least one frame each."""
    sigma2 = math.log(1.0 + sd_ratio ** 2)
    mu = math.log(asl) - sigma2 / 2
    rng = random.Random(seed)
    cuts, pos = [], 0
    while True:
        pos += max(1, round(rng.lognormvariate(mu, math.sqrt(sigma2)) * fps))
        if pos >= frames:
            return cuts
        cuts.append(pos)


def video_cuts(path: Path) -> tuple[list[int], int]:
    from vsstreamdiffvsr.encode.scenes import detect_scene_cuts
    from vsstreamdiffvsr.encode.source import open_clip

    clip, _ = open_clip(path, "file")
    return detect_scene_cuts(clip), clip.num_frames


@dataclass(frozen=True)
class Costs:
    frame_s: float
    warmup_s: float
    chunk_s: float
    part_s: float
    detect_fps: float
    join_s: float
    ray_s: float
    reader_fps: float


def simulate(chunks, gpus: int, c: Costs) -> dict[str, float]:
    """Wall time of one encode on ``gpus`` workers, with the real policy handing out the chunks."""
    policy = Policy(chunks, finished=())
    readers = max(1, min(4, gpus // 8))
    # every busy worker draws frames from the shared readers: a frame takes at least gpus / (readers * fps)
    frame_s = max(c.frame_s, gpus / (readers * c.reader_fps))
    start = c.ray_s if gpus > 1 else 0.0
    detect = max(chunk.end for chunk in chunks) / c.detect_fps
    # the workers load and warm up (compile) while the driver finds the cuts
    free = [(start + max(detect, c.warmup_s), w) for w in range(gpus)]
    heapq.heapify(free)
    busy = 0.0
    end = 0.0
    while True:
        t, w = heapq.heappop(free)
        task = policy.next()
        if task is None:
            end = max(end, t)
            if not free:
                break
            continue
        work = c.chunk_s + task.frames * frame_s + len(task.chunk.parts[task.first_part:]) * c.part_s
        busy += task.frames * c.frame_s
        for part in task.chunk.parts[task.first_part:]:
            policy.part_done(task.chunk.index, part.index)
        policy.finished(task)
        heapq.heappush(free, (t + work, w))
    wall = end + c.join_s
    return {"wall": wall, "busy": busy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--video", type=Path, help="take the cut list from PySceneDetect on this video")
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--asl", type=float, default=4.0, help="average shot length, s (default 4: films of the 2000s)")
    p.add_argument("--sd-ratio", type=float, default=1.2, help="shot length SD / mean (default 1.2, Salt)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", choices=sorted(SIZES), default="1080p", help="output size (per-frame cost)")
    p.add_argument("--max-chunk", type=int, default=2400)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--part-frames", type=int, default=240)
    p.add_argument("--chunk-overhead", type=float, default=0.5)
    p.add_argument("--part-overhead", type=float, default=1.0)
    p.add_argument("--detect-fps", type=float, default=590.0)
    p.add_argument("--join-seconds", type=float, default=15.0)
    p.add_argument("--ray-seconds", type=float, default=10.0)
    p.add_argument("--reader-fps", type=float, default=695.0)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--tuned", action="store_true",
                   help="also show each GPU count with --max-chunk lowered to about frames / (4 x GPUs)")
    args = p.parse_args(argv)

    if args.video:
        cuts, frames = video_cuts(args.video)
        source = f"{args.video.name}: {frames} frames, {len(cuts) + 1} scenes (PySceneDetect)"
    else:
        frames = round(args.hours * 3600 * args.fps)
        cuts = film_cuts(frames, args.fps, args.asl, args.sd_ratio, args.seed)
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, frames])]
        source = (f"{args.hours:g} h at {args.fps:g} fps = {frames} frames, {len(cuts) + 1} shots, lognormal "
                  f"ASL {args.asl:g} s (SD {args.sd_ratio:g} x ASL), longest {max(lengths)} frames")
    frame_ms, warm = SIZES[args.size]
    costs = Costs(frame_ms / 1000, warm, args.chunk_overhead, args.part_overhead, args.detect_fps,
                  args.join_seconds, args.ray_seconds, args.reader_fps)
    chunks = make_chunks(frames, cuts, max_chunk=args.max_chunk, warmup=args.warmup, part_frames=args.part_frames)
    print(f"film: {source}")
    print(f"plan: {len(chunks)} chunks, {sum(len(c.parts) for c in chunks)} parts, longest chunk "
          f"{max(c.compute_frames for c in chunks)} frames (--max-chunk {args.max_chunk}, --warmup {args.warmup}, "
          f"--part-frames {args.part_frames}); {args.size} out at {frame_ms} ms/frame, warm-up {warm} s per GPU")
    base = simulate(chunks, 1, costs)
    ideal = frames * costs.frame_s
    head = "| GPUs | wall | speed-up | efficiency vs 1 GPU | GPU busy | serial share |"
    if args.tuned:
        head += " --max-chunk for ~4 chunks per GPU | its efficiency |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n in args.gpus:
        r = simulate(chunks, n, costs)
        serial = frames / costs.detect_fps + costs.join_s
        row = (f"| {n} | {_clock(r['wall'])} | {base['wall'] / r['wall']:.1f}x | "
               f"{100 * base['wall'] / (n * r['wall']):.1f}% | {100 * r['busy'] / (n * r['wall']):.1f}% | "
               f"{100 * serial / r['wall']:.1f}% |")
        if args.tuned:
            mc = min(args.max_chunk, max(args.part_frames, frames // (4 * n)))
            tuned = make_chunks(frames, cuts, max_chunk=mc, warmup=args.warmup, part_frames=args.part_frames)
            t = simulate(tuned, n, costs)
            row += f" {mc} | {100 * base['wall'] / (n * t['wall']):.1f}% |"
        print(row)
    print(f"(1 GPU: {_clock(base['wall'])}; the frames alone: {_clock(ideal)})")
    return 0


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())

"""``vsstreamdiffvsr encode INPUT OUTPUT [options]``: the command line of a whole-film encode.

:func:`main` parses the arguments (``argv`` without the ``encode`` word) and returns the exit code: 0 done,
1 failed after starting, 2 bad command line or input, 3 work folder of another encode, 4 disk full,
130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from fractions import Fraction

from .errors import BAD_INPUT

__all__ = ["main", "build_parser"]


def _fps(text: str) -> tuple[int, int]:
    try:
        rate = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"must be a frame rate such as 24000/1001 or 25, got {text!r}") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return rate.numerator, rate.denominator


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    from .scenes import DEFAULT_MIN_SCENE_LEN, DEFAULT_THRESHOLD
    from .source import env_path

    p = argparse.ArgumentParser(
        prog="vsstreamdiffvsr encode",
        description="Upscale a whole video x4 with Stream-DiffVSR into OUTPUT, with the source's audio, subtitles, "
                    "chapters and metadata. Resumable: rerun the same command after any interruption. Progress goes "
                    "to stderr; stdout carries only what --dry-run prints.")
    p.add_argument("input", type=env_path, metavar="INPUT",
                   help="a video file (decoded with bestsource, YUV->RGB by its matrix) or a .vpy script whose "
                        "output 0 is the clip to upscale")
    p.add_argument("output", type=env_path, metavar="OUTPUT",
                   help="the video to write; its extension picks the container (.mkv keeps every stream)")
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="model folder (default: $VSSTREAMDIFFVSR_MODEL_DIR or the per-user cache; on a cluster, the "
                        "same path on every machine)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="where the model runs (default cuda)")
    p.add_argument("--dtype", default=None, help="U-Net/ControlNet precision: float16 (CUDA default), bfloat16, "
                                                 "float32 (CPU default)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; frame n's noise depends on (seed, n) only")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="1 (default): in this process; N > 1: a local Ray with N workers, one per GPU (with --device "
                        "cpu: N on the CPU); with --ray-address: default every GPU of the cluster")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join the Ray cluster at ADDR (e.g. 10.0.0.1:6379 or auto); run this command on its head "
                        "machine, where INPUT is")
    p.add_argument("--work-dir", type=env_path, default=None, metavar="DIR",
                   help="where the plan, finished segments and states are kept (default: OUTPUT.work beside OUTPUT); "
                        "removed after a finished encode unless --keep-work")
    p.add_argument("--max-chunk", type=int, default=2400, metavar="FRAMES",
                   help="a scene longer than this is split into pieces run in parallel (default 2400); lower it on "
                        "many GPUs (docs/encode.md)")
    p.add_argument("--warmup", type=int, default=16, metavar="FRAMES",
                   help="frames computed and discarded before each piece of a split scene (default 16)")
    p.add_argument("--part-frames", type=int, default=240, metavar="FRAMES",
                   help="frames per part: one segment and one saved state each, the most one interruption loses "
                        "per worker; short scenes are grouped up to this length (default 240)")
    p.add_argument("--encoder-args", default=None, metavar='"FFMPEG OUTPUT OPTIONS"',
                   help="ffmpeg video options replacing the default 10-bit HEVC (-c:v libx265 -preset medium -crf 17 "
                        "-pix_fmt yuv420p10le), e.g. \"-c:v ffv1\" for lossless")
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="with --device cpu: torch threads per worker (default: the machine's cores / workers; CPU "
                        "frames are bit-identical between runs with the same threads per worker)")
    p.add_argument("--fps", type=_fps, default=None, metavar="RATE",
                   help="convert a variable-frame-rate file to this constant rate (frames repeated or dropped by "
                        "their timestamps)")
    p.add_argument("--streams-from", type=env_path, default=None, metavar="FILE",
                   help="with a .vpy INPUT: copy audio, subtitles, chapters and metadata from FILE")
    p.add_argument("--scene-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"PySceneDetect ContentDetector threshold (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--min-scene-len", type=int, default=DEFAULT_MIN_SCENE_LEN, metavar="FRAMES",
                   help=f"shortest scene the detector reports (default {DEFAULT_MIN_SCENE_LEN})")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (only once it is complete)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder after a finished encode")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (chunks, frames, scenes) and an estimate to stdout, keep the plan in the work "
                        "folder, compute nothing")
    del Path
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vsstreamdiffvsr encode`` with ``argv`` (the arguments after ``encode``); returns the exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse printed its one usage line and message on stderr
        return int(exc.code) if isinstance(exc.code, int) else BAD_INPUT
    from .run import EncodeArgs, encode

    args = EncodeArgs(input=ns.input, output=ns.output, model_dir=ns.model_dir, device=ns.device, dtype=ns.dtype,
                      seed=ns.seed, workers=ns.workers, ray_address=ns.ray_address, work_dir=ns.work_dir,
                      max_chunk=ns.max_chunk, warmup=ns.warmup, part_frames=ns.part_frames,
                      encoder_args=ns.encoder_args, overwrite=ns.overwrite, dry_run=ns.dry_run, fps=ns.fps,
                      streams_from=ns.streams_from, scene_threshold=ns.scene_threshold,
                      min_scene_len=ns.min_scene_len, keep_work=ns.keep_work,
                      cpu_threads=ns.cpu_threads)
    return encode(args, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m vsstreamdiffvsr download [--dir DIR]`` and ``check [--dir DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsstreamdiffvsr",
                                     description="Stream-DiffVSR for VapourSynth: model management.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch the Stream-DiffVSR weights (Hugging Face) and RAFT-large "
                                         "(torchvision) into one model folder")
    dl.add_argument("--dir", type=Path, default=None,
                    help="model folder (default: $VSSTREAMDIFFVSR_MODEL_DIR or the per-user cache)")
    ck = sub.add_parser("check", help="validate a model folder without loading it")
    ck.add_argument("--dir", type=Path, default=None, help="model folder (default as for download)")
    args = parser.parse_args(argv)

    from . import weights

    try:
        if args.command == "download":
            root = weights.download(args.dir)
            print(f"model folder ready: {root}", file=sys.stderr)
        else:
            root = weights.validate_model_dir(args.dir)
            print(f"model folder OK: {root}", file=sys.stderr)
    except (ConnectionError, weights.ModelFilesError, OSError) as exc:
        print(f"vsstreamdiffvsr {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0

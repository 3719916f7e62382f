"""Command line: ``python -m vsstreamdiffvsr download|check [--dir DIR]`` and ``encode ...``.

Nothing but requested data goes to stdout. Every failure is one line on stderr,
``vsstreamdiffvsr <command>: <message>``, and a non-zero exit code: 1 for an error, 2 for a usage error
(or a command this build lacks), 130 when interrupted. ``check`` prints every problem of a folder, one
per line below that summary line. A programming error (anything but the expected error classes) keeps its
traceback, so that it can be reported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

PROG = "vsstreamdiffvsr"

#: what a command may fail with for reasons outside this program (files, network, memory, devices, inputs)
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, MemoryError, ImportError)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f"python -m {PROG}", description="Stream-DiffVSR for VapourSynth: model management.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch the Stream-DiffVSR weights (Hugging Face) and RAFT-large "
                                         "(torchvision) into one model folder")
    dl.add_argument("--dir", type=Path, default=None,
                    help="model folder (default: $VSSTREAMDIFFVSR_MODEL_DIR or the per-user cache)")
    ck = sub.add_parser("check", help="validate a model folder without loading it; lists every problem")
    ck.add_argument("--dir", type=Path, default=None, help="model folder (default as for download)")
    sub.add_parser("encode", add_help=False,
                   help=f"upscale a video file (options: python -m {PROG} encode --help)")
    return parser


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines and lines[0].strip() else type(exc).__name__


def _report(command: str, exc: BaseException) -> None:
    """One summary line; below it, for a model folder with several problems, one line per problem."""
    problems = getattr(exc, "problems", ())
    if len(problems) > 1:
        print(f"{PROG} {command}: {getattr(exc, 'summary', _first_line(exc))}", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
    else:
        print(f"{PROG} {command}: {_first_line(exc)}", file=sys.stderr)


def _guarded(command: str, run: Callable[[], int]) -> int:
    """``run()``, with the expected errors and Ctrl-C turned into one stderr line and an exit code."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        _report(command, exc)
        return 1


def _encode(argv: list[str]) -> int:
    """The ``encode`` subcommand, implemented in :mod:`vsstreamdiffvsr.encode.command` when present."""
    try:
        command = importlib.import_module(f"{__package__}.encode.command")
    except ModuleNotFoundError as exc:
        if exc.name in (f"{__package__}.encode", f"{__package__}.encode.command"):
            print(f"{PROG} encode: not available in this build", file=sys.stderr)
            return 2
        raise  # a dependency of the encoder is missing: reported like any other error
    return int(command.main(argv))


def _model_command(args: argparse.Namespace) -> int:
    from . import weights

    if args.command == "download":
        root = weights.download(args.dir)
        print(f"model folder ready: {root}", file=sys.stderr)
    else:
        root = weights.validate_model_dir(args.dir)
        print(f"model folder OK: {root}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse exits with 0 for --help, 2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["encode"]:
        rest = argv[1:]
        return _guarded("encode", lambda: _encode(rest))
    args = _parser().parse_args(argv)
    return _guarded(args.command, lambda: _model_command(args))

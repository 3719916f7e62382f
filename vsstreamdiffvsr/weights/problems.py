"""How the model folder's problems are reported: :class:`ModelFilesError` and the wording of its messages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .layout import ENV_MODEL_DIR


class ModelFilesError(RuntimeError):
    """A model file is missing, truncated, corrupt or does not match its config.

    ``str(exc)`` is one line naming every problem and the fix. ``problems`` holds the problems one by one
    (each names its file); ``summary`` is one line without the list (the command line prints it first and
    the problems below it).
    """

    def __init__(self, message: str, problems: Sequence[str] = (), summary: str | None = None) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
        self.summary: str = summary or message


def _fix_hint(model_dir: Path) -> str:
    return (f"fix: run `python -m vsstreamdiffvsr download --dir {model_dir}` (or point model_dir / ${ENV_MODEL_DIR} "
            "at a complete copy)")


def _fail(model_dir: Path, what: str) -> ModelFilesError:
    message = f"model folder {model_dir}: {what}; {_fix_hint(model_dir)}"
    return ModelFilesError(message, (what,), message)


def _fail_all(model_dir: Path, problems: Sequence[str]) -> ModelFilesError:
    """One error for every problem found (the same as :func:`_fail` for a single one)."""
    if len(problems) == 1:
        return _fail(model_dir, problems[0])
    listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return ModelFilesError(f"model folder {model_dir} has {len(problems)} problems: {listed}; {_fix_hint(model_dir)}",
                           problems, f"model folder {model_dir} has {len(problems)} problems; {_fix_hint(model_dir)}")


class _Found:
    """Collects the problems of several independent checks."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def attempt(self, check: Callable[..., Any], *args: Any) -> Any:
        """``check(*args)``, or None after recording the problems of its ModelFilesError."""
        try:
            return check(*args)
        except ModelFilesError as exc:
            self.problems.extend(exc.problems)
            return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    first = text[0] if len(text[0]) <= 240 else text[0][:240].rstrip() + "..."
    return f"{type(exc).__name__}: {first}"

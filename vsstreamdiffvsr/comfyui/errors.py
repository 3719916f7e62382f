"""The one exception type the nodes raise, so that ComfyUI shows one clear line (no ComfyUI imports)."""

from __future__ import annotations

import torch

__all__ = ["NodeError", "FrameOutOfMemoryError", "first_line"]


class NodeError(RuntimeError):
    """A Stream-DiffVSR node cannot run: the message is one line naming the problem and the fix."""


class FrameOutOfMemoryError(torch.OutOfMemoryError):
    """Out of device memory on a frame, with a one-line message.

    A subclass of torch's own error on purpose: ComfyUI recognises out-of-memory errors by that type and
    then unloads its models and adds its advice to the message.
    """


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``str(exc)`` (cut to ``limit`` characters if given), or the type's name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__

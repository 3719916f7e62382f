"""What ``vsstreamdiffvsr encode`` raises: one exception type whose message is the one line the user sees, and the
exit code that goes with it."""

from __future__ import annotations

import errno

__all__ = ["EncodeError", "ChunkError", "BAD_INPUT", "FAILED", "MISMATCH", "DISK_FULL", "INTERRUPTED",
           "disk_full_error"]

#: exit codes of ``vsstreamdiffvsr encode``
FAILED = 1  # the encode started and failed (a chunk's own error, ffmpeg, no workers left)
BAD_INPUT = 2  # a bad command line, input, output folder or encoder; nothing was computed
MISMATCH = 3  # the work folder belongs to another source or other settings
DISK_FULL = 4  # a disk filled up; finished work is kept: free space and rerun the same command
INTERRUPTED = 130  # Ctrl-C; rerun the same command to resume


class EncodeError(Exception):
    """A problem the user must fix: ``str(exc)`` is the whole message (one line), ``code`` the exit code."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class ChunkError(EncodeError):
    """A chunk failed for a reason of its own (a NaN source frame, an interlaced frame): the message names the
    frame. Retrying it elsewhere would fail the same way, so the encode stops."""

    def __init__(self, message: str) -> None:
        super().__init__(message, FAILED)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # travels through Ray and pickle with its message
        return (type(self), (str(self),))


def disk_full_error(exc: OSError, where: str) -> EncodeError | None:
    """The user-facing error for an ``OSError`` that means a full disk or quota (None for any other error)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EncodeError(f"no space left on the disk of {where}; finished parts are kept: free some space and "
                           "rerun the same command to resume", DISK_FULL)
    return None

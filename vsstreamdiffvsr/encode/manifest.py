"""The work folder of an encode: the plan, the finished parts (segment, state, record) and a lock.

    WORK/plan.json                 the plan (fingerprint of source + settings inside)
    WORK/cuts.txt                  the cut list, one frame number per line (for mark_scene_cuts)
    WORK/parts/cCCCCC-pPPPP.nut    a finished part's encoded segment
    WORK/parts/cCCCCC-pPPPP.state  the recurrent state after it (only when its chunk goes on mid-scene)
    WORK/parts/cCCCCC-pPPPP.json   its record, written last: a part is finished when its record exists

Every file is written under a temporary name, flushed to disk and renamed, so an interrupted write (Ctrl-C,
SIGKILL, a full disk) leaves the part unfinished, never half-finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from .errors import EncodeError, disk_full_error
from .plan import Plan

__all__ = ["WorkDir", "atomic_write"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsynced and renamed. A full disk
    becomes the DISK_FULL EncodeError; the temporary file never stays behind."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        full = disk_full_error(exc, str(path.parent))
        if full is not None:
            raise full from None
        raise EncodeError(f"cannot write {path} ({exc.strerror}); check the work folder's permissions", 1) from None


class WorkDir:
    """One encode's work folder, locked while an encode uses it (a second encode on it is refused)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parts_dir = path / "parts"
        self._lock: BinaryIO | None = None

    def open(self) -> "WorkDir":
        """Create the folder if needed and take its lock; EncodeError when it cannot be made or is in use."""
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / "lock", "a+b")
        except OSError as exc:
            full = disk_full_error(exc, str(self.path))
            if full is not None:
                raise full from None
            raise EncodeError(f"cannot create the work folder {self.path} ({exc.strerror}); choose another with "
                              "--work-dir") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise EncodeError(f"another encode is using the work folder {self.path}; wait for it to end, or give "
                              "this one another --work-dir") from None
        self._lock = lock
        return self

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- the plan
    def read_plan(self) -> Plan | None:
        path = self.path / "plan.json"
        if not path.exists():
            return None
        try:
            return Plan.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            raise EncodeError(f"{path} is damaged; remove the work folder {self.path} to start over") from None

    def write_plan(self, plan: Plan) -> None:
        atomic_write(self.path / "plan.json", plan.to_json().encode())
        atomic_write(self.path / "cuts.txt", "".join(f"{c}\n" for c in plan.cuts).encode())

    # -- parts
    def _name(self, chunk: int, part: int) -> str:
        return f"c{chunk:06d}-p{part:04d}"

    def segment_path(self, chunk: int, part: int) -> Path:
        return self.parts_dir / f"{self._name(chunk, part)}.nut"

    def state_path(self, chunk: int, part: int) -> Path:
        return self.parts_dir / f"{self._name(chunk, part)}.state"

    def finished(self) -> dict[tuple[int, int], dict[str, Any]]:
        """The records of finished parts whose segment is there with the recorded size."""
        done = {}
        for rec_path in self.parts_dir.glob("c*-p*.json"):
            try:
                rec = json.loads(rec_path.read_text())
                key = (int(rec["chunk"]), int(rec["part"]))
                seg = self.segment_path(*key)
                if seg.stat().st_size != int(rec["bytes"]):
                    continue
                if rec.get("state") and not self.state_path(*key).exists():
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged record: the part is done again
            done[key] = rec
        return done

    def save_part(self, chunk: int, part: int, segment: bytes, state: bytes | None, record: dict[str, Any]) -> None:
        """Store a finished part: segment, state, then the record that makes it count."""
        atomic_write(self.segment_path(chunk, part), segment)
        if state is not None:
            atomic_write(self.state_path(chunk, part), state)
        rec = {**record, "chunk": chunk, "part": part, "bytes": len(segment), "state": state is not None,
               "sha256": hashlib.sha256(segment).hexdigest()}
        atomic_write(self.parts_dir / f"{self._name(chunk, part)}.json", json.dumps(rec, sort_keys=True).encode())

    def state(self, chunk: int, part: int) -> bytes | None:
        path = self.state_path(chunk, part)
        return path.read_bytes() if path.exists() else None

    def remove(self) -> None:
        """Delete the folder (after a finished encode)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

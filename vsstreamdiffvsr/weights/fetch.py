"""Downloading a model folder (the Hugging Face repository and RAFT), and cleaning up after a failed download."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..models.flow import RAFT_FILENAME, RAFT_URL
from .checks import validate_model_dir
from .folder import find_raft_weights, resolve_model_dir
from .layout import HF_REPO_ID, RAFT_SHA256_PREFIX
from .problems import ModelFilesError, _short
from .prompt import empty_prompt_embedding


def download(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch the Hugging Face repo and torchvision's RAFT-large weights into one folder; cache the prompt.

    Progress bars go to stderr. Raises :class:`ConnectionError` with one line when offline, ModelFilesError
    when the folder cannot be created or the download is incomplete. A failed (or interrupted) download
    removes every folder it created that holds no finished file; finished files are kept so that the next
    run fetches only what is missing (both clients write each file under a temporary name and rename it when
    whole). What was in the folder before is never touched.
    """
    root = resolve_model_dir(model_dir)
    created = _missing_folders(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_created(created)
        raise ModelFilesError(f"cannot create the model folder {root} ({exc.strerror or _short(exc)}); fix: give "
                              "a folder you can write to") from None
    raft_dir = root / "raft"
    if not os.path.lexists(raft_dir):
        created.append(raft_dir)
    try:
        _fetch(root)
    except BaseException as exc:
        kept = _remove_created(created)
        if isinstance(exc, ConnectionError) and kept:
            raise ConnectionError(f"{exc} (the files fetched so far are kept in {root}: run the download again "
                                  "to fetch the rest)") from None
        raise
    try:
        validate_model_dir(root)
    except ModelFilesError as exc:  # e.g. an offline hub client that returned the partial folder it had
        what = "; ".join(exc.problems) if len(exc.problems) == 1 else \
            "; ".join(f"({i}) {p}" for i, p in enumerate(exc.problems, 1))
        advice = "check the network and run the download again (it fetches only what is missing)"
        raise ModelFilesError(f"the download into {root} is incomplete or damaged ({what}); {advice}", exc.problems,
                              f"the download into {root} is incomplete or damaged "
                              f"({len(exc.problems)} problems); {advice}") from None
    empty_prompt_embedding(root)
    return root


def _fetch(root: Path) -> None:
    """The Hugging Face snapshot, then RAFT unless a copy is already found; ConnectionError when offline."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=HF_REPO_ID, local_dir=str(root))
    except Exception as exc:
        raise ConnectionError(f"cannot download {HF_REPO_ID} from the Hugging Face Hub ({_short(exc)}); "
                              f"check the network, or copy the repository's files into {root}") from None
    raft_dst = root / "raft" / RAFT_FILENAME
    if find_raft_weights(root) is None:  # torch hub's copy counts: nothing to fetch then
        try:  # the hash prefix in the file name is checked: a cut-off or altered download is not kept
            raft_dst.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(RAFT_URL, str(raft_dst), hash_prefix=RAFT_SHA256_PREFIX, progress=True)
        except Exception as exc:
            raise ConnectionError(f"cannot download {RAFT_URL} ({_short(exc)}); check the network, or copy "
                                  f"{RAFT_FILENAME} into {raft_dst.parent}") from None


def _missing_folders(root: Path) -> list[Path]:
    """``root`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    for folder in (root, *root.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    return missing[::-1]


#: what the download clients leave while they work: Hugging Face's bookkeeping and partial files
_BOOKKEEPING_SUFFIXES = (".incomplete", ".partial", ".lock", ".tmp")


def _finished_files(folder: Path) -> bool:
    """Whether ``folder`` holds a file a download finished (not Hugging Face's ``.cache/huggingface``)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        if Path(dirpath) == folder / ".cache":
            dirnames[:] = [d for d in dirnames if d != "huggingface"]
        if any(not name.endswith(_BOOKKEEPING_SUFFIXES) for name in filenames):
            return True
    return False


def _remove_created(created: list[Path]) -> bool:
    """Remove, innermost first, the folders this download created that hold no finished file; True if one
    that does was kept."""
    kept = False
    for folder in reversed(created):
        if not folder.is_dir() or folder.is_symlink():
            continue
        if _finished_files(folder):
            kept = True
            continue
        shutil.rmtree(folder, ignore_errors=True)
    return kept

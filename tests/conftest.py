"""Shared fixtures: tiny random checkpoints in the exact HF layout (CPU only, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vsstreamdiffvsr.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt0"), seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_ckpt: Path):
    from vsstreamdiffvsr import StreamDiffVSR

    return StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture
def ckpt_copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny_ckpt, dst)
    return dst

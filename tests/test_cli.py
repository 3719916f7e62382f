"""``python -m vsstreamdiffvsr download|check``: exit codes and one-line messages (no network here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vsstreamdiffvsr import cli

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], tmp_path: Path, offline: bool | None = True, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("VSSTREAMDIFFVSR_MODEL_DIR", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf_home")  # never touch the user's hub cache
    env["TORCH_HOME"] = str(tmp_path / "torch_home")  # no RAFT fallback from the user's cache
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "vsstreamdiffvsr", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "no-network"])
def test_download_without_network(tmp_path: Path, offline: bool) -> None:
    target = tmp_path / "models"
    proc = _run(["download", "--dir", str(target)], tmp_path, offline=offline)
    assert proc.returncode != 0
    assert proc.stdout == ""
    line = _one_line(proc.stderr)
    assert "Stream-DiffVSR" in line
    assert not (target / "model_index.json").exists()


def test_check_tiny_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    proc = _run(["check", "--dir", str(tiny_ckpt)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_check_damaged_copy(ckpt_copy: Path, tmp_path: Path) -> None:
    (ckpt_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    proc = _run(["check", "--dir", str(ckpt_copy)], tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    line = _one_line(proc.stderr)
    assert "vae/diffusion_pytorch_model.safetensors" in line
    assert "download" in line


# In-process variants (cheap): the same entry point, driven through cli.main.

def test_main_check_uses_env_folder(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("VSSTREAMDIFFVSR_MODEL_DIR", str(tiny_ckpt))
    assert cli.main(["check"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and str(tiny_ckpt.resolve()) in out.err


@pytest.mark.parametrize("damage", ["truncate_unet", "bad_json", "missing_folder"])
def test_main_check_damaged(ckpt_copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                            tmp_path: Path, damage: str) -> None:
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    target = ckpt_copy
    if damage == "truncate_unet":
        p = ckpt_copy / "unet" / "diffusion_pytorch_model.safetensors"
        p.write_bytes(p.read_bytes()[:-1])
        name = "unet/diffusion_pytorch_model.safetensors"
    elif damage == "bad_json":
        (ckpt_copy / "controlnet" / "config.json").write_text("{ nope")
        name = "controlnet/config.json"
    else:
        target = tmp_path / "absent"
        name = str(target)
    assert cli.main(["check", "--dir", str(target)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert name in _one_line(out.err)

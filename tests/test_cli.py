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
    assert not target.exists()  # no empty folder left behind


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


# ------------------------------------------------------------------------------------------ issue 26

def _lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return err.splitlines()


@pytest.mark.parametrize("command", ["check", "download"])
def test_symlink_loop_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert cli.main([command, "--dir", str(loop)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    line = _one_line(out.err)
    assert line.startswith(f"vsstreamdiffvsr {command}: ") and str(loop) in line and "loop" in line


def test_symlink_loop_in_a_real_process(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    proc = _run(["check", "--dir", str(loop)], tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "symbolic link loop" in _one_line(proc.stderr)


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: out of memory\nmore detail"), ValueError("bad value"),
                                 MemoryError(), OSError(13, "Permission denied"), ImportError("No module named 'x'")],
                         ids=["runtime", "value", "memory", "os", "import"])
def test_last_resort_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path, exc: BaseException) -> None:
    from vsstreamdiffvsr import weights

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise exc

    monkeypatch.setattr(weights, "validate_model_dir", boom)
    assert cli.main(["check", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    line = _one_line(out.err)
    assert out.out == "" and line.startswith("vsstreamdiffvsr check: ")
    assert line != "vsstreamdiffvsr check: "


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only expected error classes are turned into one line: a programming error keeps its traceback."""
    from vsstreamdiffvsr import weights

    def bug(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(weights, "validate_model_dir", bug)
    with pytest.raises(AttributeError):
        cli.main(["check", "--dir", str(tmp_path)])


def test_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            tmp_path: Path) -> None:
    from vsstreamdiffvsr import weights

    def interrupted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "download", interrupted)
    assert cli.main(["download", "--dir", str(tmp_path)]) == 130
    assert _one_line(capsys.readouterr().err) == "vsstreamdiffvsr download: interrupted"


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["nonsense"], ["check", "--bogus"], []):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        line = _one_line(capsys.readouterr().err)
        assert "--help" in line, line


def test_check_lists_every_problem(ckpt_copy: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (ckpt_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (ckpt_copy / "vae" / "config.json").write_text("{ nope")
    p = ckpt_copy / "controlnet" / "diffusion_pytorch_model.safetensors"
    p.write_bytes(p.read_bytes()[:-3])
    assert cli.main(["check", "--dir", str(ckpt_copy)]) == 1
    out = capsys.readouterr()
    lines = _lines(out.err)
    assert out.out == ""
    assert lines[0].startswith("vsstreamdiffvsr check: ") and "has 3 problems" in lines[0]
    assert "download" in lines[0]  # the fix, in the summary line
    assert len(lines) == 4 and all(line.startswith("  - ") for line in lines[1:]), lines
    listed = "\n".join(lines[1:])
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "controlnet/diffusion_pytorch_model.safetensors"):
        assert name in listed


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("download", "check", "encode"):
        assert command in text


def _fake_encode(monkeypatch: pytest.MonkeyPatch, main) -> None:  # noqa: ANN001
    import types

    package = types.ModuleType("vsstreamdiffvsr.encode")
    package.__path__ = []  # a package
    command = types.ModuleType("vsstreamdiffvsr.encode.command")
    command.main = main
    package.command = command
    monkeypatch.setitem(sys.modules, "vsstreamdiffvsr.encode", package)
    monkeypatch.setitem(sys.modules, "vsstreamdiffvsr.encode.command", command)


def test_encode_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    _fake_encode(monkeypatch, lambda argv: seen.append(argv) or 7)
    assert cli.main(["encode", "in.mkv", "--dir", "x", "--help"]) == 7
    assert seen == [["in.mkv", "--dir", "x", "--help"]]


@pytest.mark.parametrize("missing", ["vsstreamdiffvsr.encode.command"])  # (the package itself is in this build)
def test_encode_not_in_this_build(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                  missing: str) -> None:
    if missing.endswith("command"):
        _fake_encode(monkeypatch, lambda argv: 0)
    monkeypatch.setitem(sys.modules, missing, None)  # an import of it fails as if it did not exist
    assert cli.main(["encode", "in.mkv"]) == 2
    assert _one_line(capsys.readouterr().err) == "vsstreamdiffvsr encode: not available in this build"


def test_encode_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fails(argv):  # noqa: ANN001, ANN202
        raise ModuleNotFoundError("No module named 'av'", name="av")

    _fake_encode(monkeypatch, fails)
    assert cli.main(["encode", "in.mkv"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("vsstreamdiffvsr encode: ") and "'av'" in line

    def interrupted(argv):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    _fake_encode(monkeypatch, interrupted)
    assert cli.main(["encode", "in.mkv"]) == 130
    assert _one_line(capsys.readouterr().err) == "vsstreamdiffvsr encode: interrupted"

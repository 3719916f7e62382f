"""StreamState: construction checks, immutability, clone/to, save/load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vsstreamdiffvsr import StreamState


def _state(frame_count: int = 3, dtype: torch.dtype = torch.float32) -> StreamState:
    g = torch.Generator().manual_seed(0)
    hq = (torch.randn(1, 3, 32, 40, generator=g) * 1.5).to(dtype)  # unclamped values beyond [-1, 1]
    lq = torch.rand(1, 3, 8, 10, generator=g)
    return StreamState(prev_hq=hq, prev_lq=lq, frame_count=frame_count)


def test_empty_state_is_cold() -> None:
    s = StreamState()
    assert s.is_cold and s.prev_hq is None and s.prev_lq is None and s.frame_count == 0
    assert s.lr_size is None


def test_warm_state_properties() -> None:
    s = _state()
    assert not s.is_cold
    assert s.lr_size == (8, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    s = _state(frame_count=17, dtype=dtype)
    path = tmp_path / "s.safetensors"
    s.save(path)
    back = StreamState.load(path)
    assert back.frame_count == 17
    assert back.prev_hq.dtype == dtype and back.prev_lq.dtype == torch.float32
    assert torch.equal(back.prev_hq, s.prev_hq)
    assert torch.equal(back.prev_lq, s.prev_lq)
    assert float(back.prev_hq.abs().max()) > 1.0  # nothing was clamped on the way


def test_save_load_empty_state(tmp_path: Path) -> None:
    for fc in (0, 5):
        path = tmp_path / f"empty{fc}.safetensors"
        StreamState(frame_count=fc).save(str(path))  # str paths work too
        back = StreamState.load(str(path))
        assert back.is_cold and back.frame_count == fc


def test_load_rejects_non_state_files(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"prev_hq": torch.zeros(1, 3, 8, 8), "prev_lq": torch.zeros(1, 3, 2, 2)}, str(other))
    with pytest.raises(ValueError):
        StreamState.load(other)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 this is not safetensors at all")
    with pytest.raises(ValueError):
        StreamState.load(garbage)
    with pytest.raises(ValueError):
        StreamState.load(tmp_path / "does_not_exist.safetensors")


def test_load_rejects_inconsistent_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"prev_hq": torch.zeros(1, 3, 8, 8), "prev_lq": torch.zeros(1, 3, 3, 3)}, str(path),
              metadata={"format": "vsstreamdiffvsr.StreamState/1", "frame_count": "1"})
    with pytest.raises(ValueError):
        StreamState.load(path)


def test_clone_is_deep() -> None:
    s = _state()
    c = s.clone()
    assert c is not s and c.frame_count == s.frame_count
    assert c.prev_hq.data_ptr() != s.prev_hq.data_ptr() and c.prev_lq.data_ptr() != s.prev_lq.data_ptr()
    before_hq, before_lq = s.prev_hq.clone(), s.prev_lq.clone()
    c.prev_hq.fill_(7.0)
    c.prev_lq.fill_(0.25)
    assert torch.equal(s.prev_hq, before_hq) and torch.equal(s.prev_lq, before_lq)
    e = StreamState(frame_count=4).clone()
    assert e.is_cold and e.frame_count == 4


def test_to_device() -> None:
    s = _state()
    same = s.to("cpu")
    assert same.prev_hq.device.type == "cpu" and torch.equal(same.prev_hq, s.prev_hq)
    assert same.frame_count == s.frame_count
    meta = s.to(torch.device("meta"))
    assert meta.prev_hq.device.type == "meta" and meta.prev_lq.device.type == "meta"
    assert meta.prev_hq.shape == s.prev_hq.shape and meta.frame_count == s.frame_count
    assert s.prev_hq.device.type == "cpu"  # the original is untouched
    empty = StreamState(frame_count=2)
    assert empty.to("meta").is_cold and empty.to("meta").frame_count == 2


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        StreamState(prev_hq=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        StreamState(prev_lq=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        StreamState(prev_hq=torch.zeros(1, 3, 32, 32), prev_lq=torch.zeros(1, 3, 8, 9))  # not 4x
    with pytest.raises(ValueError):
        StreamState(prev_hq=torch.zeros(1, 3, 16, 16), prev_lq=torch.zeros(1, 3, 8, 8))  # 2x
    with pytest.raises(ValueError):
        StreamState(prev_hq=torch.zeros(3, 32, 32), prev_lq=torch.zeros(3, 8, 8))  # not 4-D
    with pytest.raises(ValueError):
        StreamState(frame_count=-1)
    StreamState(prev_hq=torch.zeros(1, 3, 32, 36), prev_lq=torch.zeros(1, 3, 8, 9))  # 4x of an odd size is fine
    # what the model cannot take fails here, with the field named, not inside a convolution later
    with pytest.raises(ValueError, match=r"prev_hq must be a \(1, 3, h, w\) float tensor, got \(1, 5, 32, 32\)"):
        StreamState(prev_hq=torch.zeros(1, 5, 32, 32), prev_lq=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="prev_lq must be a .* float tensor, got .*torch.int32"):
        StreamState(prev_hq=torch.zeros(1, 3, 32, 32), prev_lq=torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="frame_count must be an integer"):
        StreamState(frame_count=1.5)  # type: ignore[arg-type]


def test_states_compare_by_identity() -> None:
    s = _state()
    assert s == s and s != s.clone()  # no "Boolean value of Tensor ... is ambiguous"


def test_load_rejects_a_bad_frame_count(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"prev_hq": torch.zeros(1, 3, 8, 8), "prev_lq": torch.zeros(1, 3, 2, 2)}, str(path),
              metadata={"format": "vsstreamdiffvsr.StreamState/1", "frame_count": "many"})
    with pytest.raises(ValueError, match=f"{path.name} holds no valid StreamState"):
        StreamState.load(path)


def test_state_is_frozen() -> None:
    s = _state()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.frame_count = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prev_hq = None  # type: ignore[misc]
    assert s.frame_count == 3


# ------------------------------------------------------------------------------ what is at the path (issue 26)

_FMT = "vsstreamdiffvsr.StreamState/1"


def test_load_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes (with the GIL held): it must not be opened.

    This test holds a read-write descriptor on the FIFO so that even a wrong implementation cannot hang it."""
    import os

    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    guard = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(ValueError, match=f"{fifo.name} is not a regular file .*FIFO"):
            StreamState.load(fifo)
    finally:
        os.close(guard)


def test_load_of_a_fifo_returns_at_once(tmp_path: Path) -> None:
    """The real case, no writer anywhere: a separate interpreter, so a hang fails the test instead of the suite."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    code = ("import sys\nfrom vsstreamdiffvsr import StreamState\ntry:\n    StreamState.load(sys.argv[1])\n"
            "except ValueError as e:\n    print(e)\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "not a regular file" in proc.stdout


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a regular file .*directory"):
        StreamState.load(tmp_path)


def test_load_follows_a_symlink_to_a_state(tmp_path: Path) -> None:
    s = _state(frame_count=2)
    s.save(tmp_path / "real.safetensors")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "real.safetensors")
    assert StreamState.load(tmp_path / "link.safetensors").frame_count == 2


def test_save_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    import os

    s = _state()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "link.safetensors"
    link.symlink_to(victim)
    fifo = tmp_path / "f.fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for target, kind in ((link, "symbolic link"), (fifo, "FIFO"), (folder, "directory")):
        with pytest.raises(ValueError, match=f"{target.name} exists and is not a regular file .*{kind}"):
            s.save(target)
    assert link.is_symlink() and victim.read_text() == "keep me"
    assert fifo.is_fifo() and folder.is_dir() and not any(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.fifo", "folder", "link.safetensors", "victim.txt"]


def test_save_replaces_atomically_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way leaves the previous file whole and no temporary file behind."""
    import safetensors.torch

    path = tmp_path / "s.safetensors"
    _state(frame_count=5).save(path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):  # noqa: ANN001
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="No space left"):
        _state(frame_count=6).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    monkeypatch.undo()
    _state(frame_count=7).save(path)  # a regular file is replaced
    assert StreamState.load(path).frame_count == 7
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_save_into_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="nowhere"):
        _state().save(tmp_path / "nowhere" / "s.safetensors")
    assert not (tmp_path / "nowhere").exists()


def _write(path: Path, hq: torch.Tensor | None, lq: torch.Tensor | None, frame_count: str | None = "1",
           **extra: torch.Tensor) -> Path:
    tensors = dict(extra)
    if hq is not None:
        tensors["prev_hq"] = hq
    if lq is not None:
        tensors["prev_lq"] = lq
    meta = {"format": _FMT}
    if frame_count is not None:
        meta["frame_count"] = frame_count
    save_file(tensors, str(path), metadata=meta)
    return path


def _nan_hq() -> tuple[torch.Tensor, torch.Tensor]:
    hq = torch.zeros(1, 3, 32, 32)
    hq[0, 1, 5, 7] = float("nan")
    return hq, torch.zeros(1, 3, 8, 8)


def _inf_lq() -> tuple[torch.Tensor, torch.Tensor]:
    lq = torch.zeros(1, 3, 8, 8)
    lq[0, 0, 0, 0] = float("-inf")
    return torch.zeros(1, 3, 32, 32), lq


BAD_STATES = {
    "nan-prev_hq": (_nan_hq, {}, "prev_hq holds NaN or infinite values"),
    "inf-prev_lq": (_inf_lq, {}, "prev_lq holds NaN or infinite values"),
    "float8": (lambda: (torch.zeros(1, 3, 32, 32, dtype=torch.float8_e4m3fn), torch.zeros(1, 3, 8, 8)), {},
               "prev_hq is stored as F8_E4M3"),
    "int": (lambda: (torch.zeros(1, 3, 32, 32, dtype=torch.int32), torch.zeros(1, 3, 8, 8)), {},
            "prev_hq is stored as I32"),
    "absurd-size": (lambda: (torch.zeros(1, 3, 4 * 5000, 4, dtype=torch.float16), torch.zeros(1, 3, 5000, 1)), {},
                    "prev_lq is 5000x1"),
    "extra-tensor": (lambda: (torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 8, 8)), {"x": torch.zeros(1)},
                     "unexpected tensors"),
    "count-spaces": (lambda: (None, None), {"frame_count": " 12"}, "frame_count"),
    "count-underscore": (lambda: (None, None), {"frame_count": "1_000"}, "frame_count"),
    "count-arabic-digits": (lambda: (None, None), {"frame_count": "\u0661\u0662"}, "frame_count"),
    "count-negative": (lambda: (None, None), {"frame_count": "-1"}, "frame_count"),
    "count-huge": (lambda: (None, None), {"frame_count": "9" * 20}, "frame_count"),
    "count-missing": (lambda: (None, None), {"frame_count": None}, "frame_count"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_load_refuses_bad_contents(tmp_path: Path, case: str) -> None:
    make, options, needle = BAD_STATES[case]
    hq, lq = make()
    extra = {k: v for k, v in options.items() if isinstance(v, torch.Tensor)}
    count = options.get("frame_count", "1")
    path = _write(tmp_path / f"{case}.safetensors", hq, lq, frame_count=count, **extra)
    with pytest.raises(ValueError) as info:
        StreamState.load(path)
    msg = str(info.value)
    assert path.name in msg and needle in msg, msg
    assert "\n" not in msg


def test_load_keeps_float_dtypes_and_large_counts(tmp_path: Path) -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        path = _write(tmp_path / f"{dtype}.safetensors", torch.zeros(1, 3, 32, 36, dtype=dtype),
                      torch.zeros(1, 3, 8, 9), frame_count=str(10**12))
        back = StreamState.load(path)
        assert back.prev_hq.dtype == dtype and back.frame_count == 10**12


def test_load_to_a_bad_device_names_it(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    _state().save(path)
    with pytest.raises(ValueError, match="nonsense"):
        StreamState.load(path, device="nonsense")

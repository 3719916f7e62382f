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

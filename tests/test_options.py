"""Options: one frozen object, normalised and checked in one place, resolved per device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vsstreamdiffvsr import Options
from vsstreamdiffvsr.options import resolve_corr


def test_values_are_normalised_so_equal_choices_compare_equal() -> None:
    a = Options(device="cpu:1", dtype="fp16", vae_dtype="bf16", raft_dtype="AUTO", tile=64)
    b = Options(device=torch.device("cpu"), dtype=torch.float16, vae_dtype=torch.bfloat16, tile=(64, 64))
    assert a == b and hash(a) == hash(b)
    assert a.device == torch.device("cpu") and a.raft_dtype is None and a.tile == (64, 64)
    assert Options(tile=0).tile is None and Options(tile=[32, 48]).tile == (32, 48)


def test_frozen_and_keyword_only() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Options().tile = (32, 32)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Options("cpu")  # type: ignore[misc]
    assert dataclasses.replace(Options(), flow="lr").flow == "lr"


@pytest.mark.parametrize(("fields", "needle"), [
    ({"device": "gpu"}, "device must be like"),
    ({"device": 3}, "device must be like"),
    ({"device": "meta"}, "unsupported device"),
    ({"dtype": "float64"}, "dtype must be None, float32, float16 or bfloat16, got 'float64'"),
    ({"vae_dtype": 16}, "vae_dtype must be None"),
    ({"raft_dtype": "fp8"}, "raft_dtype must be None"),
    ({"flow": "quarter"}, "flow must be one of ('hr', 'lr')"),
    ({"flow": None}, "flow must be one of ('hr', 'lr'), got None"),  # never silently the default
    ({"raft_corr": None}, "raft_corr must be one of"),
    ({"raft_corr": "huge"}, "raft_corr must be one of"),
    ({"compile_mode": "fast"}, "compile_mode must be one of"),
    ({"compile": "0"}, "compile must be None, True or False, got '0'"),
    ({"compile_flow": 1}, "compile_flow must be None, True or False"),
    ({"prefetch_flow": None}, "prefetch_flow must be True or False"),
    ({"nan_fallback": "yes"}, "nan_fallback must be True or False"),
    ({"tile": 30}, "tile sides must be multiples of 8 and at least 32"),
    ({"tile": (64, "x")}, "tile must be None, an int or (height, width)"),
    ({"tile": True}, "tile must be None, an int or (height, width)"),
    ({"tile_overlap": 6}, "tile_overlap must be a non-negative multiple of 4"),
    ({"tile_denoise": True}, "tile_denoise=True needs a tile size"),
    ({"tile": 32, "tile_overlap": 24}, "tile_overlap (24) must be at most half the smaller tile side (32"),
    ({"compile_cache_dir": 5}, "compile_cache_dir must be a folder path or None"),
])
def test_a_bad_value_is_one_line_naming_the_field(fields: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        Options(**fields)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_resolution_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import vsstreamdiffvsr.options as options

    cpu, cuda = Options(device="cpu"), Options(device="cuda")
    assert cpu.unet_dtype == torch.float32 and cuda.unet_dtype == torch.float16
    assert not cpu.nhwc and cuda.nhwc and not cpu.autotune
    assert not cpu.compiled and not cpu.flow_compiled  # the CPU runs eagerly unless asked
    monkeypatch.setattr(options, "_has_triton", lambda: True)
    assert cuda.compiled and cuda.flow_compiled and cuda.uses_cuda_graphs and not cuda.autotune
    assert not Options(device="cuda", compile_flow=False).flow_compiled
    assert Options(device="cpu", compile=True, compile_flow=None).flow_compiled is False  # RAFT only on CUDA
    monkeypatch.setattr(options, "_has_triton", lambda: False)
    assert not cuda.compiled and cuda.autotune  # no Triton: the eager path, with cuDNN autotuning
    assert Options(device="cuda", compile=True).compiled  # asked for: kept (and refused with a clear error at load)


def test_choices_by_frame_size() -> None:
    assert [Options().corr_for(h, w) for h, w in ((720, 1280), (1088, 1920), (2160, 3840))] == ["full", "half",
                                                                                                 "lean"]
    assert resolve_corr("lean", 64, 64) == "lean"
    assert Options(device="cuda").raft_dtype_for(1088, 1920) == torch.float16
    assert Options(device="cuda").raft_dtype_for(720, 1280) == torch.float32
    assert Options(device="cpu", raft_dtype="bf16").raft_dtype_for(720, 1280) == torch.bfloat16


def test_from_strings_reads_vspipe_arguments_by_field_type() -> None:
    got = Options.from_strings({"device": "cpu", "compile": "0", "tile": "192", "tile_denoise": "yes",
                                "raft_dtype": "auto", "compile_flow": "none", "flow": "lr"})
    assert got == Options(device="cpu", compile=False, tile=192, tile_denoise=True, flow="lr")
    base = Options(device="cpu", tile=64)
    assert Options.from_strings({"tile": "0"}, base).tile is None
    for bad, needle in (({"compile": "maybe"}, "compile must be 0 or 1"), ({"tile": "big"}, "tile must be an integer"),
                        ({"tiles": "1"}, "unknown option 'tiles'"), ({"flow": "x"}, "flow must be one of")):
        with pytest.raises(ValueError, match=needle):
            Options.from_strings(bad)

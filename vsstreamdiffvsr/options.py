"""The pipeline's options: names, accepted values and their checks, each failing with one plain line.

Shared by :class:`~vsstreamdiffvsr.pipeline.StreamDiffVSR`, :func:`~vsstreamdiffvsr.filter.upscale` and the
scripts, so a bad value reads the same from every entry point.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .errors import SlowPrecisionWarning
from .models.flow import CORR_MODES, corr_pyramid_bytes

__all__ = ["parse_dtype", "parse_component_dtype", "parse_raft_dtype", "dtype_name", "default_dtype",
           "warn_cpu_float16", "parse_device", "raft_input_size", "resolve_corr", "resolve_raft_dtype",
           "resolve_compile_flow", "check_graph_flow", "choice", "check_overlap", "check_tiling", "FLOW_MODES",
           "COMPILE_MODES", "CUDA_GRAPH_MODES", "DEFAULT_COMPILE_MODE", "RAFT_CORR_MODES", "FULL_CORR_MAX",
           "HALF_CORR_MAX"]

FLOW_MODES = ("hr", "lr")
#: torch.compile modes we accept
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")
#: torch.compile modes that replay CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: compile=True's mode: CUDA graphs (on an H100 at 720p, 81 ms per frame's denoise+decode vs 128 ms for
#: "default"; scripts/bench.py)
DEFAULT_COMPILE_MODE = "reduce-overhead"
RAFT_CORR_MODES = ("auto", *CORR_MODES)
#: raft_corr="auto" keeps the reference's float32 pyramid up to this size (1.1 GB at 720p output, 5.6 GB at
#: 1080p, 88 GB at 4K), stores it in float16 up to HALF_CORR_MAX (2.8 GB at 1080p), and above that uses
#: the lean correlation (no pyramid).
FULL_CORR_MAX = 2 * 2**30
HALF_CORR_MAX = 4 * 2**30


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or a name (``"float32"``, ``"bfloat16"``, ``"float16"`` and short forms)."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")


def parse_component_dtype(name: str, dtype: torch.dtype | str | None) -> torch.dtype:
    """A component's precision option ``name`` (``vae_dtype``): None = float32, the reference; else as
    :func:`parse_dtype`, with an error that names the option. (``raft_dtype``'s None is a rule of its own:
    :func:`parse_raft_dtype`.)"""
    if dtype is None:
        return torch.float32
    try:
        return parse_dtype(dtype)
    except ValueError:
        raise ValueError(f"{name} must be None, float32, float16 or bfloat16, got {dtype!r}") from None


def parse_raft_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``raft_dtype``: None or ``"auto"`` (returned as None: chosen per frame size by :func:`resolve_raft_dtype`),
    else a precision as :func:`parse_dtype`, with an error that names the option."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return None
    try:
        return parse_dtype(dtype)
    except ValueError:
        raise ValueError(f"raft_dtype must be None (auto), float32, float16 or bfloat16, got {dtype!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``, for messages."""
    return str(dtype).removeprefix("torch.")


def default_dtype(device: torch.device) -> torch.dtype:
    """The U-Net/ControlNet precision when none is asked for: float16 on CUDA, float32 elsewhere (CPU
    half-precision kernels are slower than float32 ones).

    float16 rather than bfloat16: the same tensor-core rate on the GPUs this targets, three more mantissa
    bits (69 against 51 dB PSNR to float32 on calibrated random weights), and the precision of the fp16
    engines the reference's TensorRT acceleration path builds. A frame that overflows float16's range comes back
    NaN/Inf and is recomputed in float32 (``nan_fallback``); ``dtype="bfloat16"`` cannot overflow.
    """
    return torch.float16 if device.type == "cuda" else torch.float32


def warn_cpu_float16(device: torch.device, stacklevel: int = 3, **dtypes: torch.dtype) -> None:
    """One warning when any of ``dtypes`` (option name -> dtype) is float16 on the CPU.

    torch's CPU float16 convolutions have no fast kernels on most CPUs: a 3x3 convolution of 128 channels took
    7.9 s in float16 against 24 ms in float32 on this project's test machine (an AMD EPYC with AVX512-BF16 but not
    AVX512-FP16), where bfloat16 took 8 ms. Nothing is changed: the option is the user's.
    """
    names = [name for name, dt in dtypes.items() if dt == torch.float16]
    if device.type == "cpu" and names:
        warnings.warn(f"vsstreamdiffvsr: {', '.join(names)}=float16 on the CPU: torch's CPU float16 convolutions "
                      "are typically hundreds of times slower than float32 ones; leave the option at None for "
                      "float32 (the CPU default)", SlowPrecisionWarning, stacklevel=stacklevel)


def parse_device(device: torch.device | str) -> torch.device:
    """torch device, checked to exist (a clear error instead of a CUDA init traceback)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available (no GPU, or a CPU-only torch build); pass device='cpu' "
                             "or install torch with CUDA")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"unsupported device {dev}")
    return dev


def raft_input_size(height: int, width: int, flow: str) -> tuple[int, int]:
    """The size RAFT runs at for LR frames of height x width: x4 for ``flow="hr"``, the LR frame padded to
    multiples of 8 for ``flow="lr"``; what :func:`resolve_corr` and :func:`resolve_raft_dtype` take."""
    return (4 * height, 4 * width) if flow == "hr" else (height + -height % 8, width + -width % 8)


def resolve_corr(raft_corr: str, height: int, width: int) -> str:
    """``raft_corr`` for RAFT input of height x width: ``"auto"`` resolved by the pyramid's size."""
    if raft_corr != "auto":
        return raft_corr
    full = corr_pyramid_bytes(height, width)
    return "full" if full <= FULL_CORR_MAX else "half" if full // 2 <= HALF_CORR_MAX else "lean"


def resolve_raft_dtype(raft_dtype: torch.dtype | None, dtype: torch.dtype, device: torch.device, height: int,
                       width: int) -> torch.dtype:
    """The precision of RAFT's networks for RAFT input of height x width: ``raft_dtype`` if one was given; else
    (auto) float16 on CUDA for a float16 pipeline (``dtype``, the U-Net's) where RAFT's input is past 720p
    output (where ``raft_corr="auto"`` leaves the float32 pyramid: 1080p and up), and float32, the reference,
    everywhere else.

    Why there: up to 720p the float32 RAFT runs beside the denoising within the frame's time, so the
    reference numerics stay; from 1080p RAFT is what stands between the frame and its time (on an H100, 52 ms
    of RAFT against 171 ms of denoising and decoding per frame, of which the overlap hid ~13 ms), and float16
    runs its convolutions at twice TF32's rate. Its picture cost is far below the float16 U-Net's: 107 dB
    against float32 RAFT's output (CPU, random weights), where the float16 U-Net is at ~71 dB. RAFT's own
    mixed-precision recipe keeps the correlation, its lookups and the flow coordinates in float32.
    """
    if raft_dtype is not None:
        return raft_dtype
    if device.type == "cuda" and dtype == torch.float16 and resolve_corr("auto", height, width) != "full":
        return torch.float16
    return torch.float32


def resolve_compile_flow(value: bool | None, compile: bool, device: torch.device) -> bool:
    """``compile_flow``: None means RAFT is compiled whenever the denoising is, on CUDA (where RAFT's unfused
    elementwise and normalisation kernels take ~40% of its time); elsewhere only when asked for."""
    if value is None:
        return bool(compile) and device.type == "cuda"
    return bool(value)


def check_graph_flow(value: bool | None, device: torch.device) -> bool:
    """``graph_flow``: None means off; on needs CUDA (graphs are a CUDA feature)."""
    if value is None:
        return False
    if value and device.type != "cuda":
        raise ValueError(f"graph_flow=True needs a CUDA device, not {device}; leave it at None")
    return bool(value)


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` of option ``name`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_overlap(value: int) -> int:
    """``tile_overlap``: LR pixels, a non-negative multiple of 4 (the latent's and RAFT's grids)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value % 4:
        raise ValueError(f"tile_overlap must be a non-negative multiple of 4 (LR pixels), got {value!r}")
    return value


def check_tiling(tile: tuple[int, int] | None, overlap: int, tile_denoise: Any) -> bool:
    """Validate the tiling options together; returns ``tile_denoise``."""
    if not isinstance(tile_denoise, bool):
        raise ValueError(f"tile_denoise must be True or False, got {tile_denoise!r}")
    if tile_denoise and tile is None:
        raise ValueError("tile_denoise=True needs a tile size (tile=...); without one, frames run whole and the "
                         "out-of-memory fallback picks the tiling")
    if tile is not None and 2 * overlap > min(tile):
        raise ValueError(f"tile_overlap ({overlap}) must be at most half the smaller tile side ({min(tile)} LR px); "
                         "lower tile_overlap or use larger tiles")
    return tile_denoise

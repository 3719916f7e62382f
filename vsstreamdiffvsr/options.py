"""The pipeline's options: one frozen object, grouped, each field with its one-line meaning, checked in one place.

:class:`Options` is what :meth:`StreamDiffVSR.from_pretrained <vsstreamdiffvsr.pipeline.StreamDiffVSR.from_pretrained>`,
its views (``with_options``), :func:`vsstreamdiffvsr.upscale`, ``scripts/upscale.vpy`` and ``scripts/bench.py``
take. A bad value fails in ``__post_init__`` with one ``ValueError`` line naming the field and what it accepts.
The rules that turn an ``"auto"`` into a choice for a given frame size live beside it (``resolve_*``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SlowPrecisionWarning
from .models.correlation import CORR_MODES, corr_pyramid_bytes

__all__ = ["Options", "parse_dtype", "dtype_name", "parse_device", "raft_input_size", "resolve_corr",
           "resolve_raft_dtype", "FLOW_MODES", "COMPILE_MODES", "CUDA_GRAPH_MODES", "RAFT_CORR_MODES",
           "FULL_CORR_MAX", "HALF_CORR_MAX"]

FLOW_MODES = ("hr", "lr")
#: torch.compile modes we accept
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")
#: torch.compile modes that replay CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
RAFT_CORR_MODES = ("auto", *CORR_MODES)
#: raft_corr="auto" keeps the reference's float32 pyramid up to this size (720p output), stores it in float16
#: up to HALF_CORR_MAX (1080p), and above that uses the lean correlation (no pyramid)
FULL_CORR_MAX = 2 * 2**30
HALF_CORR_MAX = 4 * 2**30

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass(frozen=True, kw_only=True)
class Options:
    """How the pipeline runs. Every field has a default; ``dataclasses.replace`` makes a changed copy.

    Values are normalised on construction (``dtype="fp16"`` becomes ``torch.float16``, ``tile=64`` becomes
    ``(64, 64)``), so two equal choices compare equal.
    """

    # -- where, and in what precision
    #: ``"cuda"``, ``"cuda:N"`` or ``"cpu"`` (checked to exist when the model loads)
    device: torch.device | str = "cuda"
    #: U-Net/ControlNet precision; None: float16 on CUDA, float32 elsewhere (float32 is the reference)
    dtype: torch.dtype | str | None = None
    #: tiny VAE precision (TPM features, decoder); None: float32, the reference
    vae_dtype: torch.dtype | str | None = None
    #: RAFT's networks; None/"auto": float16 from 1080p output on CUDA with a float16 dtype, else float32
    raft_dtype: torch.dtype | str | None = None

    # -- optical flow
    #: ``"hr"``: RAFT on the bicubic x4 frames (the reference); ``"lr"``: RAFT at LR, flow x4 (faster, a deviation)
    flow: str = "hr"
    #: RAFT's correlation: ``"full"`` (reference), ``"half"`` (float16 pyramid), ``"lean"`` (no pyramid) or ``"auto"``
    raft_corr: str = "auto"

    # -- speed
    #: torch.compile the warm denoising step, TPM encoder and decoder; None: on CUDA (where Triton works), off elsewhere
    compile: bool | None = None
    #: torch.compile mode; the CUDA-graph modes run frames on one worker thread per GPU
    compile_mode: str = "reduce-overhead"
    #: also compile RAFT (in parts, never CUDA graphs); None: whenever the denoising is compiled on CUDA
    compile_flow: bool | None = None
    #: kernel cache folder; None: ``$TORCHINDUCTOR_CACHE_DIR`` or ``<user cache>/vsstreamdiffvsr/inductor``
    compile_cache_dir: str | os.PathLike[str] | None = None
    #: NHWC U-Net/ControlNet/VAE; None: on CUDA
    channels_last: bool | None = None
    #: cuDNN autotuning while frames run; None: on CUDA unless compiled with CUDA graphs
    cudnn_benchmark: bool | None = None
    #: the filter computes frame n+1's flow on a side CUDA stream while frame n denoises (the same output)
    prefetch_flow: bool = True

    # -- memory
    #: LR tile (int or (h, w), multiples of 8, >= 32) for the HR stages; None: whole frames (tiles on out-of-memory)
    tile: int | tuple[int, int] | None = None
    #: LR pixels shared by neighbouring denoising tiles (a multiple of 4, at most half the smaller tile side)
    tile_overlap: int = 16
    #: with ``tile``: denoise per tile too (less memory; moves the picture)
    tile_denoise: bool = False
    #: on CUDA out-of-memory: tiles, then tiled denoising, then smaller tiles (RAFT: lean correlation, then LR)
    oom_fallback: bool = True

    # -- safety nets
    #: a half-precision frame with NaN/Inf is recomputed in float32 (a float32 one fails with an error)
    nan_fallback: bool = True

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise in place, once
        put(self, "device", _device(self.device))
        put(self, "dtype", None if self.dtype is None else _named_dtype("dtype", self.dtype))
        put(self, "vae_dtype", None if self.vae_dtype is None else _named_dtype("vae_dtype", self.vae_dtype))
        raft = self.raft_dtype
        put(self, "raft_dtype", None if raft is None or (isinstance(raft, str) and raft.lower() == "auto")
            else _named_dtype("raft_dtype", raft))
        _one_of("flow", self.flow, FLOW_MODES)
        _one_of("raft_corr", self.raft_corr, RAFT_CORR_MODES)
        _one_of("compile_mode", self.compile_mode, COMPILE_MODES)
        for name in ("compile", "compile_flow", "channels_last", "cudnn_benchmark"):
            _flag(name, getattr(self, name), optional=True)
        for name in ("prefetch_flow", "tile_denoise", "oom_fallback", "nan_fallback"):
            _flag(name, getattr(self, name))
        if self.compile_cache_dir is not None and not isinstance(self.compile_cache_dir, (str, os.PathLike)):
            raise ValueError(f"compile_cache_dir must be a folder path or None, got {type(self.compile_cache_dir).__name__}")
        put(self, "tile", _tile(self.tile))
        ov = self.tile_overlap
        if not isinstance(ov, int) or isinstance(ov, bool) or ov < 0 or ov % 4:
            raise ValueError(f"tile_overlap must be a non-negative multiple of 4 (LR pixels), got {ov!r}")
        if self.tile_denoise and self.tile is None:
            raise ValueError("tile_denoise=True needs a tile size (tile=...); without one, frames run whole and the "
                             "out-of-memory fallback picks the tiling")
        if self.tile is not None and 2 * ov > min(self.tile):
            raise ValueError(f"tile_overlap ({ov}) must be at most half the smaller tile side ({min(self.tile)} LR "
                             "px); lower tile_overlap or use larger tiles")

    # -- what the options mean once the device is known
    @property
    def torch_device(self) -> torch.device:
        assert isinstance(self.device, torch.device)
        return self.device

    @property
    def unet_dtype(self) -> torch.dtype:
        """``dtype`` resolved: float16 on CUDA, float32 elsewhere when None."""
        if self.dtype is not None:
            return self.dtype  # type: ignore[return-value]
        return torch.float16 if self.torch_device.type == "cuda" else torch.float32

    @property
    def vae_precision(self) -> torch.dtype:
        return self.vae_dtype if self.vae_dtype is not None else torch.float32  # type: ignore[return-value]

    @property
    def compiled(self) -> bool:
        """``compile`` resolved: None means on for CUDA when Triton can run there."""
        if self.compile is not None:
            return bool(self.compile)
        return self.torch_device.type == "cuda" and _has_triton()

    @property
    def flow_compiled(self) -> bool:
        """``compile_flow`` resolved: None follows the denoising's compile, on CUDA only."""
        if self.compile_flow is not None:
            return bool(self.compile_flow)
        return self.compiled and self.torch_device.type == "cuda"

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.compiled and self.compile_mode in CUDA_GRAPH_MODES

    @property
    def nhwc(self) -> bool:
        return self.torch_device.type == "cuda" if self.channels_last is None else bool(self.channels_last)

    @property
    def autotune(self) -> bool:
        """``cudnn_benchmark`` resolved (graph warm-up with autotuning peaked far above the steady memory)."""
        if self.cudnn_benchmark is not None:
            return bool(self.cudnn_benchmark)
        return self.torch_device.type == "cuda" and not self.uses_cuda_graphs

    def raft_dtype_for(self, height: int, width: int) -> torch.dtype:
        """RAFT's network precision for RAFT input of height x width (:func:`resolve_raft_dtype`)."""
        return resolve_raft_dtype(self.raft_dtype, self.unet_dtype, self.torch_device, height, width)  # type: ignore[arg-type]

    def corr_for(self, height: int, width: int) -> str:
        """RAFT's correlation for RAFT input of height x width (:func:`resolve_corr`)."""
        return resolve_corr(self.raft_corr, height, width)

    def warn_cpu_float16(self, stacklevel: int = 3) -> None:
        """One warning when a component is asked for in float16 on the CPU, where its convolutions are far slower."""
        names = [n for n in ("dtype", "vae_dtype", "raft_dtype") if getattr(self, n) == torch.float16]
        if self.torch_device.type == "cpu" and names:
            warnings.warn(f"vsstreamdiffvsr: {', '.join(names)}=float16 on the CPU: torch's CPU float16 convolutions "
                          "are typically hundreds of times slower than float32 ones; leave the option at None for "
                          "float32 (the CPU default)", SlowPrecisionWarning, stacklevel=stacklevel)

    @classmethod
    def from_strings(cls, values: Mapping[str, Any], base: "Options | None" = None) -> "Options":
        """Options from text values (``vspipe -a name=value``): ``1``/``0``/``true``/``none`` and numbers are
        read by each field's type; unknown names fail with the list of known ones."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        parsed: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in fields:
                raise ValueError(f"unknown option {name!r}; known: {', '.join(fields)}")
            parsed[name] = _from_text(name, str(raw), str(fields[name].type))
        return dataclasses.replace(base or cls(), **parsed)


# ---------------------------------------------------------------------------------------------- checks

def _from_text(name: str, text: str, annotation: str) -> Any:
    low = text.strip().lower()
    if "None" in annotation and low in ("", "none", "auto"):
        return None
    if annotation.startswith("bool"):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be 0 or 1, got {text!r}")
    if annotation.startswith("int"):
        try:
            return int(low)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {text!r}") from None
    return text.strip()


def _flag(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):  # "0" from a vspipe -a argument is truthy
        raise ValueError(f"{name} must be {'None, ' if optional else ''}True or False, got {value!r}")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or a name (``"float32"``, ``"bfloat16"``, ``"float16"`` and short forms)."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")


def _named_dtype(name: str, dtype: Any) -> torch.dtype:
    try:
        return parse_dtype(dtype)
    except ValueError:
        raise ValueError(f"{name} must be None, float32, float16 or bfloat16, got {dtype!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``, for messages."""
    return str(dtype).removeprefix("torch.")


def _device(device: Any) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be like 'cuda', 'cuda:1' or 'cpu', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
    if dev.type not in ("cuda", "cpu", "mps", "xpu"):
        raise ValueError(f"unsupported device {dev}")
    if dev.type == "cpu":
        dev = torch.device("cpu")  # "cpu:0" and "cpu:1" are the one CPU: one model, not three
    return dev


def parse_device(device: torch.device | str) -> torch.device:
    """A torch device that exists on this machine (a plain error instead of a CUDA init traceback)."""
    dev = _device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available (no GPU, or a CPU-only torch build); use device cpu "
                             "(vspipe: -a device=cpu; Python: device='cpu') or install torch with CUDA")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        if dev.index is None:  # "cuda" and "cuda:0" are one GPU: one model, one worker
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _tile(tile: Any) -> tuple[int, int] | None:
    """``None``/0 (no tiling), an int (square) or (height, width) in LR pixels; multiples of 8, >= 32."""
    if tile is None or (isinstance(tile, int) and not isinstance(tile, bool) and tile == 0):
        return None
    if isinstance(tile, int) and not isinstance(tile, bool):
        th = tw = tile
    elif isinstance(tile, (tuple, list)) and len(tile) == 2 and all(
            isinstance(t, int) and not isinstance(t, bool) for t in tile):
        th, tw = int(tile[0]), int(tile[1])
    else:
        raise ValueError(f"tile must be None, an int or (height, width) in LR pixels, got {tile!r}")
    if th < 32 or tw < 32 or th % 8 or tw % 8:
        raise ValueError(f"tile sides must be multiples of 8 and at least 32 LR pixels, got {th}x{tw}")
    return th, tw


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


# --------------------------------------------------------------------------------- choices by frame size

def raft_input_size(height: int, width: int, flow: str) -> tuple[int, int]:
    """The size RAFT runs at for LR frames of height x width: x4 for ``flow="hr"``, the LR frame padded to
    multiples of 8 for ``flow="lr"``."""
    return (4 * height, 4 * width) if flow == "hr" else (height + -height % 8, width + -width % 8)


def resolve_corr(raft_corr: str, height: int, width: int) -> str:
    """``raft_corr`` for RAFT input of height x width: ``"auto"`` resolved by the pyramid's size."""
    if raft_corr != "auto":
        return raft_corr
    full = corr_pyramid_bytes(height, width)
    return "full" if full <= FULL_CORR_MAX else "half" if full // 2 <= HALF_CORR_MAX else "lean"


def resolve_raft_dtype(raft_dtype: torch.dtype | None, dtype: torch.dtype, device: torch.device, height: int,
                       width: int) -> torch.dtype:
    """RAFT's network precision: ``raft_dtype`` if given; else (auto) float16 on CUDA for a float16 pipeline
    where RAFT's input is past 720p output (where the float32 pyramid ends), float32 everywhere else.

    Up to 720p the float32 RAFT runs beside the denoising within the frame's time; from 1080p it is what
    stands between the frame and its time, and float16 runs its convolutions at twice TF32's rate for a
    picture cost far below the float16 U-Net's (docs/performance.md). RAFT's own mixed-precision recipe keeps
    the correlation, its lookups and the flow coordinates in float32.
    """
    if raft_dtype is not None:
        return raft_dtype
    if device.type == "cuda" and dtype == torch.float16 and resolve_corr("auto", height, width) != "full":
        return torch.float16
    return torch.float32


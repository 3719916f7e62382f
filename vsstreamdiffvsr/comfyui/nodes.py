"""The ComfyUI nodes. Only ComfyUI imports this module (it imports ComfyUI's own modules).

Types passed between nodes: ``STREAMDIFFVSR_PIPE`` (:class:`~.models.PipeHandle`) and ``STREAMDIFFVSR_STATE``
(:class:`~.frames.NodeState`). Every failure reaches ComfyUI as one exception with a one-line message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from . import files
from .errors import NodeError, first_line
from .frames import NodeState, check_images, padded_size, state_image, upscale_batch
from .models import DTYPES, FLOWS, MODEL_FOLDER, PipeHandle, find_model, load_pipe, model_names
from ..state import StreamState

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

PIPE = "STREAMDIFFVSR_PIPE"
STATE = "STREAMDIFFVSR_STATE"
CATEGORY = "image/upscaling/Stream-DiffVSR"
SEED_MAX = 0xFFFFFFFFFFFFFFFF

folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER), is_default=True)


def _model_bases() -> list[str]:
    return folder_paths.get_folder_paths(MODEL_FOLDER)


def _states_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), files.STATE_FOLDER)


def _devices() -> list[str]:
    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(comfy.model_management.get_torch_device())
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise NodeError(f"device must be auto, cpu or cuda:N, got {name!r}") from None


def _memory_wanted(h: int, w: int) -> int:
    """Bytes of device memory to make room for before a batch of h x w LR frames: a rough upper bound from the
    peaks measured at 720p and 1080p (weights included; see docs/comfyui.md, Memory)."""
    out_megapixels = 16 * h * w / 1e6
    return int((2.0 + 5.0 * out_megapixels) * 2**30)


def _tiled(handle: PipeHandle, tile: int, tile_overlap: int, tile_denoise: bool) -> Any:
    if tile == 0:
        if tile_denoise:
            raise NodeError("tile_denoise needs a tile size: set tile (e.g. 256) or turn tile_denoise off")
        return handle.pipe
    try:
        return handle.pipe.with_options(tile=tile, tile_overlap=tile_overlap, tile_denoise=tile_denoise)
    except ValueError as exc:
        raise NodeError(f"tiling: {first_line(exc)}") from None


def _run(handle: PipeHandle, images: torch.Tensor, state: NodeState | None, seed: int, tile: int,
         tile_overlap: int, tile_denoise: bool) -> tuple[torch.Tensor, NodeState]:
    if not isinstance(handle, PipeHandle):
        raise NodeError("pipe must come from the Stream-DiffVSR Loader node")
    if state is not None and not isinstance(state, NodeState):
        raise NodeError("state must come from a Stream-DiffVSR state node or an upscale node's state output")
    b, h, w = check_images(images)
    pipe = _tiled(handle, tile, tile_overlap, tile_denoise)
    if handle.device.type != "cpu":  # ask ComfyUI to move its own models out of the way first
        comfy.model_management.free_memory(_memory_wanted(*padded_size(h, w)), handle.device)
    bar = comfy.utils.ProgressBar(b)
    return upscale_batch(pipe, images, state, seed, device=handle.device,
                         output_device=comfy.model_management.intermediate_device(),
                         check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                         progress=lambda done, total: bar.update_absolute(done, total))


def _tiling_inputs() -> dict[str, Any]:
    return {
        "tile": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                         "tooltip": "LR tile size for large frames (a multiple of 8); 0 = whole frames"}),
        "tile_overlap": ("INT", {"default": 16, "min": 0, "max": 512, "step": 4,
                                 "tooltip": "LR pixels shared by neighbouring denoising tiles (a multiple of 4)"}),
        "tile_denoise": ("BOOLEAN", {"default": False,
                                     "tooltip": "also denoise per tile: less memory, but the picture changes"}),
    }


def _seed_input() -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                    "tooltip": "noise seed; frame n of the stream always gets the same noise for a seed"})


class StreamDiffVSR_Loader:
    DESCRIPTION = "Load a Stream-DiffVSR model folder from models/stream_diffvsr/."
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": (model_names(_model_bases()), {"tooltip": "a model folder in models/stream_diffvsr/"}),
            "device": (_devices(), {"default": "auto", "tooltip": "auto = ComfyUI's device"}),
            "dtype": (list(DTYPES), {"default": "auto",
                                     "tooltip": "auto = float16 on CUDA, float32 elsewhere (the reference)"}),
            "flow": (list(FLOWS), {"default": "hr",
                                   "tooltip": "hr = the reference; lr = faster, needs frames of 128 px or more"}),
            "compile": ("BOOLEAN", {"default": False,
                                    "tooltip": "torch.compile: minutes for the first frames, then faster on CUDA"}),
        }}

    def load(self, model: str, device: str, dtype: str, flow: str, compile: bool) -> tuple[PipeHandle]:
        model_dir = find_model(model, _model_bases())
        return (load_pipe(model_dir, name=model, device=_device(device), dtype=dtype, flow=flow, compile=compile),)


class StreamDiffVSR_Upscale:
    DESCRIPTION = ("Upscale an image batch x4, the batch in time order, continuing from a state if one is given; "
                   "returns the state after the last frame to continue with the next batch.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", STATE)
    RETURN_NAMES = ("images", "state")
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"pipe": (PIPE,), "images": ("IMAGE",), "seed": _seed_input(), **_tiling_inputs()},
                "optional": {"state": (STATE, {"tooltip": "the state of the previous batch; none = a cold start "
                                                          "at frame 0"})}}

    def upscale(self, pipe: PipeHandle, images: torch.Tensor, seed: int, tile: int, tile_overlap: int,
                tile_denoise: bool, state: NodeState | None = None) -> tuple[torch.Tensor, NodeState]:
        return _run(pipe, images, state, seed, tile, tile_overlap, tile_denoise)


class StreamDiffVSR_ProcessFrame:
    DESCRIPTION = "Upscale one frame x4 from a state; returns the frame and the new state."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", STATE)
    RETURN_NAMES = ("image", "state")
    FUNCTION = "process"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"pipe": (PIPE,), "image": ("IMAGE",), "state": (STATE,), "seed": _seed_input(),
                             **_tiling_inputs()}}

    def process(self, pipe: PipeHandle, image: torch.Tensor, state: NodeState, seed: int, tile: int,
                tile_overlap: int, tile_denoise: bool) -> tuple[torch.Tensor, NodeState]:
        b, _, _ = check_images(image, "image")
        if b != 1:
            raise NodeError(f"image must be one frame, got a batch of {b}; use the Stream-DiffVSR Upscale node for "
                            "batches")
        return _run(pipe, image, state, seed, tile, tile_overlap, tile_denoise)


class StreamDiffVSR_CreateState:
    DESCRIPTION = "An empty state: the next frame is a cold start, numbered first_frame for its noise."
    CATEGORY = CATEGORY
    RETURN_TYPES = (STATE,)
    RETURN_NAMES = ("state",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"first_frame": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                                     "tooltip": "the stream index of the next frame (its noise)"})}}

    def create(self, first_frame: int) -> tuple[NodeState]:
        return (NodeState(StreamState(frame_count=first_frame)),)


class StreamDiffVSR_ExtractState:
    DESCRIPTION = "The state's previous output frame as an image."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("image", "next_frame")
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"state": (STATE,)}}

    def extract(self, state: NodeState) -> tuple[torch.Tensor, int]:
        if not isinstance(state, NodeState):
            raise NodeError("state must come from a Stream-DiffVSR node")
        return state_image(state, comfy.model_management.intermediate_device()), state.next_frame


class StreamDiffVSR_SaveState:
    DESCRIPTION = "Save a state to output/stream_diffvsr_states/ to continue the stream in a later run."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"state": (STATE,),
                             "filename_prefix": ("STRING", {"default": "state",
                                                            "tooltip": "relative to output/stream_diffvsr_states/"})}}

    def save(self, state: NodeState, filename_prefix: str) -> dict[str, Any]:
        if not isinstance(state, NodeState):
            raise NodeError("state must come from a Stream-DiffVSR node")
        folder, name, counter, subfolder, _ = _save_path(filename_prefix, _states_dir())
        path = files.write_state(state, Path(folder) / f"{name}_{counter:05}_{files.SUFFIX}")
        rel = Path(files.STATE_FOLDER, subfolder).as_posix()
        return {"ui": {"states": [{"filename": path.name, "subfolder": rel, "type": "output",
                                   "next_frame": state.next_frame}]}}


class StreamDiffVSR_LoadState:
    DESCRIPTION = "Load a state saved by Save State (from output/stream_diffvsr_states/)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (STATE,)
    RETURN_NAMES = ("state",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"state_file": (files.list_states(_states_dir()),
                                            {"tooltip": "a file in output/stream_diffvsr_states/"})}}

    @classmethod
    def IS_CHANGED(cls, state_file: str) -> str:
        try:
            st = (Path(_states_dir()) / state_file).stat()
        except OSError:
            return ""
        return f"{st.st_mtime_ns}:{st.st_size}"

    def load(self, state_file: str) -> tuple[NodeState]:
        return (files.read_state(_states_dir(), state_file),)


class StreamDiffVSR_SaveFrames:
    DESCRIPTION = ("Save an image batch losslessly (float32 safetensors, key 'images', shape (B, H, W, 3)) to the "
                   "output folder, for tools that want the frames unrounded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",),
                             "filename_prefix": ("STRING", {"default": "stream_diffvsr/frames"})}}

    def save(self, images: torch.Tensor, filename_prefix: str) -> dict[str, Any]:
        check_images(images)
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = _save_path(filename_prefix, out_dir)
        path = files.write_frames(images, Path(folder) / f"{name}_{counter:05}_{files.SUFFIX}")
        return {"ui": {"frames": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]}}


def _save_path(prefix: str, folder: str) -> tuple[str, str, int, str, str]:
    """ComfyUI's numbered file name for ``prefix`` under ``folder`` (its checks keep files inside ``folder``)."""
    try:
        return folder_paths.get_save_image_path(prefix, folder)
    except Exception as exc:
        raise NodeError(f"filename_prefix {prefix!r}: {first_line(exc).strip('* ')}") from None


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    StreamDiffVSR_Loader, StreamDiffVSR_Upscale, StreamDiffVSR_ProcessFrame, StreamDiffVSR_CreateState,
    StreamDiffVSR_ExtractState, StreamDiffVSR_SaveState, StreamDiffVSR_LoadState, StreamDiffVSR_SaveFrames)}

NODE_DISPLAY_NAME_MAPPINGS = {
    "StreamDiffVSR_Loader": "Stream-DiffVSR Loader",
    "StreamDiffVSR_Upscale": "Stream-DiffVSR Upscale (x4)",
    "StreamDiffVSR_ProcessFrame": "Stream-DiffVSR Process Frame",
    "StreamDiffVSR_CreateState": "Stream-DiffVSR Create State",
    "StreamDiffVSR_ExtractState": "Stream-DiffVSR Extract State",
    "StreamDiffVSR_SaveState": "Stream-DiffVSR Save State",
    "StreamDiffVSR_LoadState": "Stream-DiffVSR Load State",
    "StreamDiffVSR_SaveFrames": "Stream-DiffVSR Save Frames (lossless)",
}

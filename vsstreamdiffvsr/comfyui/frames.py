"""ComfyUI IMAGE batches through the Stream-DiffVSR pipeline, frame by frame (no ComfyUI imports).

ComfyUI passes images as (B, H, W, C) float32 tensors in [0, 1], the batch in time order. Each frame is
run exactly as the VapourSynth filter runs it (:func:`vsstreamdiffvsr.upscale`): clamped to [0, 1], given the
noise ``frame_noise(seed, n, (1, C, ceil4(h), ceil4(w)))`` where ``n`` counts frames from the start of the
stream, padded by edge replication to multiples of 4 and cropped back to exactly 4x after (the pipeline
pads and crops). A batch continues the numbering of the state it starts from (:attr:`StreamState.frame_count`),
so batches chained through their states give the frames of one long batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import frame_noise
from ..state import StreamState
from .errors import FrameOutOfMemoryError, NodeError, first_line

__all__ = ["SCALE", "MIN_SIDE", "NodeState", "padded_size", "check_images", "check_state_fits", "upscale_batch",
           "state_image"]

SCALE = 4
#: the smallest LR side the pipeline takes (RAFT needs 128 px after x4)
MIN_SIDE = 32


@dataclass(frozen=True, eq=False)
class NodeState:
    """The STREAMDIFFVSR_STATE the nodes pass along: the pipeline's state and the frame size it belongs to.

    Attributes:
        stream: the pipeline's :class:`StreamState` (its tensors are at the padded size).
        size: (h, w) in LR pixels of the frames before padding; None when not known (an empty state, or one
            loaded from a file, which holds the padded size only).
    """

    stream: StreamState
    size: tuple[int, int] | None = None

    @property
    def next_frame(self) -> int:
        """The stream index of the next frame: the number of frames this state has seen."""
        return self.stream.frame_count


def padded_size(h: int, w: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of 4, the size the pipeline runs at."""
    return 4 * math.ceil(h / 4), 4 * math.ceil(w / 4)


def check_images(images: Any, what: str = "images") -> tuple[int, int, int]:
    """(B, H, W) of a ComfyUI IMAGE batch; NodeError naming the problem and the fix if it is not one we take."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NodeError(f"{what} must be an IMAGE batch of shape (batch, height, width, 3), got {got}")
    b, h, w, c = (int(s) for s in images.shape)
    if c != 3:
        fix = "; split the alpha off first (Split Image with Alpha)" if c == 4 else ""
        raise NodeError(f"{what} must be RGB (3 channels), got {c} channels{fix}")
    if not images.is_floating_point():
        raise NodeError(f"{what} must be float in [0, 1], got {images.dtype}")
    if b < 1:
        raise NodeError(f"{what} is an empty batch; give at least one frame")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise NodeError(f"{what} must be at least {MIN_SIDE}x{MIN_SIDE} pixels (the optical flow needs "
                        f"{SCALE * MIN_SIDE} px after x{SCALE}), got {w}x{h} (width x height); scale them up first")
    return b, h, w


def check_state_fits(state: NodeState, h: int, w: int) -> None:
    """NodeError if ``state`` holds frames of another size than (h, w) (LR pixels, before padding)."""
    if state.stream.is_cold:
        return
    lr = state.stream.lr_size
    fits = state.size == (h, w) if state.size is not None else lr == padded_size(h, w)
    if not fits:
        held = state.size or lr
        assert held is not None
        raise NodeError(f"the state comes from {held[1]}x{held[0]} frames but these are {w}x{h} (width x height); "
                        "connect the state of a run at this size, or none to start cold")


def upscale_batch(pipe: Any, images: torch.Tensor, state: NodeState | None, seed: int, *,
                  device: torch.device | str, output_device: torch.device | str = "cpu",
                  check_interrupt: Callable[[], None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, NodeState]:
    """Super-resolve an IMAGE batch in time order, continuing from ``state``.

    Args:
        pipe: a :class:`~vsstreamdiffvsr.StreamDiffVSR` (or a view of one with other options).
        images: (B, H, W, 3) float in [0, 1] (values outside are clamped, as the filter does); H, W >= 32.
        state: where the stream stands (None: a cold start at frame 0).
        seed: the noise seed; frame n of the stream gets ``frame_noise(seed, n, ...)``.
        device: the pipeline's device, where each frame is sent before it runs.
        output_device: where the output batch is kept (ComfyUI's intermediate device).
        check_interrupt: called before each frame; it raises to stop between frames.
        progress: called after each frame with (frames done, frames in the batch).

    Returns:
        ``(out, new_state)``: out is (B, 4H, 4W, 3) float32 in [0, 1] on ``output_device``.

    Raises:
        NodeError: a bad batch, a state of another frame size, non-finite values, or a failing frame (one line).
        FrameOutOfMemoryError: the device ran out of memory on a frame.
        Whatever ``check_interrupt`` raises.
    """
    b, h, w = check_images(images)
    state = state if state is not None else NodeState(StreamState())
    check_state_fits(state, h, w)
    hp, wp = padded_size(h, w)
    noise_shape = (1, int(pipe.latent_channels), hp, wp)
    start = state.next_frame
    stream = state.stream.to(device)
    out = torch.empty((b, SCALE * h, SCALE * w, 3), dtype=torch.float32, device=output_device)
    for i in range(b):
        if check_interrupt is not None:
            check_interrupt()
        n = start + i
        x = images[i].to(device=device, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0).contiguous()
        if not bool(torch.isfinite(x).all()):  # before the clamp, which would turn +-inf into 1 and 0
            raise NodeError(f"frame {i} of the batch holds NaN or infinite values; fix the images before upscaling")
        try:
            hq, stream = pipe.process_frame(x.clamp(0.0, 1.0), stream, noise=frame_noise(seed, n, noise_shape))
        except torch.OutOfMemoryError as exc:
            raise FrameOutOfMemoryError(f"frame {i} of the batch: out of memory on {device} ({first_line(exc, 200)}); "
                                        "set a tile size (e.g. 256) or use a smaller dtype") from None
        except ValueError as exc:  # ours (a size, a state, a range): short, and the whole line matters
            raise NodeError(f"frame {i} of the batch: {first_line(exc)}") from None
        except Exception as exc:  # NonFiniteOutputError, a device error...: one line naming the frame
            raise NodeError(f"frame {i} of the batch: {type(exc).__name__}: {first_line(exc, 400)}") from None
        out[i] = hq[0].permute(1, 2, 0).to(output_device)
        if progress is not None:
            progress(i + 1, b)
    return out, NodeState(stream, (h, w))


def state_image(state: NodeState, output_device: torch.device | str = "cpu") -> torch.Tensor:
    """The state's previous output frame as a (1, 4h, 4w, 3) IMAGE in [0, 1] (cropped when the size is known).

    Raises:
        NodeError: the state is empty (nothing has been upscaled yet).
    """
    prev = state.stream.prev_hq
    if prev is None:
        raise NodeError("the state is empty (a cold start): it holds no previous frame; connect the state output "
                        "of an upscale node or a loaded state")
    hq = (prev.float() / 2 + 0.5).clamp(0, 1)  # the same mapping as the pipeline's output
    if state.size is not None:
        hq = hq[..., : SCALE * state.size[0], : SCALE * state.size[1]]
    return hq[0].permute(1, 2, 0).unsqueeze(0).to(device=output_device, dtype=torch.float32).contiguous()

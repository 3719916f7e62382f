"""Helpers shared by the pipeline tests: test frames with their noise, a stream run, PSNR."""

from __future__ import annotations

import math

import torch

from vsstreamdiffvsr import StreamDiffVSR, StreamState


def frames_and_noise(n: int, h: int, w: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``n`` random LR frames (1,3,h,w) in [0, 1] and ``n`` latent noises (1,4,h,w), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, h, w, generator=g) for _ in range(n)], [torch.randn(1, 4, h, w, generator=g)
                                                                     for _ in range(n)]


def run(pipe: StreamDiffVSR, frames: list[torch.Tensor], noises: list[torch.Tensor]) -> list[torch.Tensor]:
    """The frames as one stream from a cold start: each frame's output."""
    state, outs = StreamState(), []
    for f, z in zip(frames, noises):
        hq, state = pipe.process_frame(f, state, noise=z)
        outs.append(hq)
    return outs


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pictures in [0, 1] (capped at 200 dB for equal ones)."""
    return 10 * math.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-20))

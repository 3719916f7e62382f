"""What every view of one loaded model shares: its components, its runtime (lock, worker, notices), the compiled
functions, and what the out-of-memory ladders learned per frame size."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .components import Components
from .runtime import Runtime

__all__ = ["Model"]


class Model:
    """One model on one device. Views (:class:`~vsstreamdiffvsr.pipeline.StreamDiffVSR` with other options) hold
    a reference; nothing here depends on a view's options except through keys that name them."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self.device = components.device
        self.runtime = Runtime(components.device)
        #: compiled function sets by a key naming what they depend on (what, mode, backend, precision)
        self.compiled: dict[tuple[Any, ...], dict[str, Callable[..., Any]]] = {}
        #: (LR size, flow, raft_corr, raft_dtype) -> "lean" or "lr": the RAFT out-of-memory fallback that fitted
        self.flow_fallbacks: dict[tuple[Any, ...], str] = {}
        #: (LR size, tile, tile_denoise, tile_overlap) -> the tile plan the out-of-memory ladder settled on
        self.tile_plans: dict[tuple[Any, ...], Any] = {}
        #: the side stream that computes flows ahead (CUDA only)
        self.flow_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._float32: Components | None = None
        self._float32_lock = threading.Lock()

    def compiled_set(self, key: tuple[Any, ...], make: Callable[[], dict[str, Callable[..., Any]]]
                     ) -> dict[str, Callable[..., Any]]:
        """The compiled functions under ``key``, made once: a view or a second ``upscale()`` reuses them (and
        their CUDA graphs) instead of compiling anew."""
        if key not in self.compiled:
            self.compiled[key] = make()
        return self.compiled[key]

    def float32(self) -> Components:
        """The float32 components of the NaN fallback, loaded on first use and shared by every view."""
        with self._float32_lock:
            if self._float32 is None:
                c = self.components
                self._float32 = c if c.dtype == c.vae_dtype == torch.float32 else c.float32()
            return self._float32

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

"""vsstreamdiffvsr: Stream-DiffVSR (4-step diffusion video super-resolution, x4) for VapourSynth.

Public face:

* :func:`upscale` - the VapourSynth filter (``vsstreamdiffvsr.upscale(clip, ...)``);
* :class:`StreamDiffVSR` and :class:`StreamState` - the per-frame pipeline, usable without VapourSynth.

Imports are lazy: ``import vsstreamdiffvsr`` loads neither torch models nor VapourSynth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["upscale", "StreamDiffVSR", "StreamState", "__version__"]

if TYPE_CHECKING:
    from .filter import upscale
    from .pipeline import StreamDiffVSR
    from .state import StreamState


def __getattr__(name: str) -> Any:
    if name == "upscale":
        from .filter import upscale

        return upscale
    if name == "StreamDiffVSR":
        from .pipeline import StreamDiffVSR

        return StreamDiffVSR
    if name == "StreamState":
        from .state import StreamState

        return StreamState
    raise AttributeError(f"module 'vsstreamdiffvsr' has no attribute {name!r}")

"""vsstreamdiffvsr: Stream-DiffVSR (4-step diffusion video super-resolution, x4) for VapourSynth.

Public face:

* :func:`upscale` - the VapourSynth filter (``vsstreamdiffvsr.upscale(clip, ...)``);
* :class:`Options` - every pipeline option, in one frozen object;
* :class:`StreamDiffVSR` and :class:`StreamState` - the per-frame pipeline, usable without VapourSynth;
* :func:`frame_noise` - the initial latent noise of frame n, a pure function of (seed, n).

Imports are lazy: ``import vsstreamdiffvsr`` loads neither torch models nor VapourSynth.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["upscale", "Options", "StreamDiffVSR", "StreamState", "frame_noise", "__version__"]

if TYPE_CHECKING:
    from .filter import upscale
    from .options import Options
    from .pipeline import StreamDiffVSR, frame_noise
    from .state import StreamState

_WHERE = {"upscale": ".filter", "Options": ".options", "StreamDiffVSR": ".pipeline", "frame_noise": ".pipeline",
          "StreamState": ".state"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'vsstreamdiffvsr' has no attribute {name!r}")

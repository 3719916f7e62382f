"""``vsstreamdiffvsr encode``: a whole film, file to file, resumable, on one GPU, every GPU of a machine, or a Ray
cluster (docs/encode.md). Modules, one job each: ``command`` (the command line), ``run`` (one encode from start
to end), ``source`` (the input), ``scenes`` (cut list), ``plan`` (chunks and parts), ``manifest`` (the work
folder), ``worker`` (a chunk on a pipeline), ``scheduler`` (policy and driver loop), ``cluster`` (Ray), ``mux``
(ffmpeg), ``progress`` (stderr).

For ``.vpy`` users: :func:`mark_scene_cuts` marks an encode's cut list (or any) on a clip, and
:func:`detect_scene_cuts` finds one, so that ``vspipe`` restarts the model exactly where ``encode`` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["mark_scene_cuts", "detect_scene_cuts", "load_cuts", "main"]


def __getattr__(name: str) -> Any:
    if name in ("mark_scene_cuts", "detect_scene_cuts", "load_cuts"):
        from . import scenes

        return getattr(scenes, name)
    if name == "main":
        from .command import main

        return main
    raise AttributeError(f"module 'vsstreamdiffvsr.encode' has no attribute {name!r}")

"""ComfyUI entry point: with this repository cloned into ComfyUI's ``custom_nodes/``, ComfyUI imports this file
and registers the Stream-DiffVSR nodes (docs/comfyui.md). Outside ComfyUI it registers nothing and imports
nothing.

Inside ComfyUI the package is imported from this clone under its own name, ``vsstreamdiffvsr``, so that the
nodes run the code they came with, whether or not a ``vsstreamdiffvsr`` is installed in ComfyUI's Python too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def _import_from_clone() -> None:
    if "vsstreamdiffvsr" in sys.modules:
        return
    package = Path(__file__).resolve().parent / "vsstreamdiffvsr"
    spec = importlib.util.spec_from_file_location("vsstreamdiffvsr", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import vsstreamdiffvsr from {package}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vsstreamdiffvsr"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["vsstreamdiffvsr"]
        raise


NODE_CLASS_MAPPINGS: dict[str, Any] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

if importlib.util.find_spec("folder_paths") is not None:  # ComfyUI's own module: we are loaded by ComfyUI
    _import_from_clone()
    from vsstreamdiffvsr.comfyui import nodes as _nodes

    NODE_CLASS_MAPPINGS.update(_nodes.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_nodes.NODE_DISPLAY_NAME_MAPPINGS)

"""ComfyUI nodes for Stream-DiffVSR (see docs/comfyui.md).

ComfyUI loads the nodes through the repository's top-level ``__init__.py`` (a clone in ``custom_nodes/``),
which imports :mod:`.nodes`. Importing this package, or its modules other than :mod:`.nodes`, imports
nothing of ComfyUI. Example workflows are in ``workflows/`` (API format ``*.api.json``, UI format ``*.json``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["WORKFLOWS"]

#: the folder holding the example workflows
WORKFLOWS = Path(__file__).resolve().parent / "workflows"

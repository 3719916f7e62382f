"""VapourSynth glue: ``upscale()`` (``node.py``), the ordered producer that keeps the recurrence exact under
parallel, out-of-order requests (``producer.py``), and frames <-> tensors (``frames.py``)."""

from .node import get_pipeline, upscale

__all__ = ["upscale", "get_pipeline"]

"""VapourSynth glue: ``upscale()`` (``upscale.py``), the ordered producer that keeps the recurrence exact under
parallel, out-of-order requests (``producer.py``), and frames <-> tensors (``frames.py``)."""

from .upscale import get_pipeline, upscale

__all__ = ["upscale", "get_pipeline"]

"""The per-frame algorithm, one stage per module (nothing VapourSynth-specific here).

One frame, top to bottom (:class:`StreamDiffVSR` in ``stream.py`` calls them in this order):

* ``components.py`` - stage 0: the networks of a model folder, loaded once (``model.py``: what views share);
* ``inputs.py``     - stage 1: the LR frame checked and padded, the initial latent noise;
* ``flow.py``       - stage 2: RAFT flow (precision, correlation, out-of-memory ladder, look-ahead), the warp;
* ``denoise.py``    - stage 3: ARTG embedding, 4 DDIM steps, TPM features, decoder;
* ``tiled.py``      - stage 3 in tiles: the plan per frame size and its out-of-memory ladder (``tiles.py``: geometry);
* ``runtime.py``, ``compiling.py`` - where frames run: lock, worker thread, flags; torch.compile and its cache.
"""

from .inputs import LRFrame, frame_noise
from .stream import StreamDiffVSR

__all__ = ["StreamDiffVSR", "LRFrame", "frame_noise"]

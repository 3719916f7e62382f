#!/usr/bin/env python3
"""Digests of the tiny-checkpoint outputs, to show that a refactoring changed no byte.

    python scripts/digests.py            # prints one line per case: name, sha256 of the output bytes

Cases: ``process_frame`` over a panning stream (cold, then warm; whole frames, HR-stage tiles, tiled
denoising, flow at LR); ``upscale()`` with its frames requested in a shuffled order from 4 threads; and a
``vspipe`` run of the same clip. All on the CPU in float32 with a tiny random checkpoint (seed 0).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VPY = """
import sys
sys.path.insert(0, {repo!r})
import vapoursynth as vs
import vsstreamdiffvsr
from tests.vsclips import make_source
vs.core.num_threads = 4
vsstreamdiffvsr.upscale(make_source(34, 32, 10, cuts={{6}}), model_dir={model!r}, device="cpu").set_output()
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tensor_bytes(tensors: list[torch.Tensor]) -> bytes:
    return b"".join(t.detach().float().contiguous().cpu().numpy().tobytes() for t in tensors)


def pipeline_cases(model: Path) -> dict[str, str]:
    from vsstreamdiffvsr import StreamDiffVSR, StreamState

    g = torch.Generator().manual_seed(7)
    big = torch.rand(1, 3, 40, 160, generator=g)
    out: dict[str, str] = {}
    cases = {"whole": {}, "tiles": {"tile": 32}, "tile_denoise": {"tile": 32, "tile_denoise": True,
                                                                  "tile_overlap": 8},
             "flow_lr": {"flow": "lr"}}
    for name, opts in cases.items():
        h, w = (128, 128) if name == "flow_lr" else (32, 48)
        frames = [torch.nn.functional.interpolate(big[..., i: i + 40], size=(h, w), mode="bilinear").clamp(0, 1)
                  for i in range(4)]
        noises = [torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]
        pipe = _load(StreamDiffVSR, model, opts)
        state, outs = StreamState(), []
        for f, z in zip(frames, noises):
            hq, state = pipe.process_frame(f, state, noise=z)
            outs.append(hq)
        out[f"process_frame/{name}"] = _sha(_tensor_bytes(outs) + _tensor_bytes([state.prev_hq]))
    return out


def _load(cls, model: Path, opts: dict):  # noqa: ANN001, ANN202
    try:  # the options object (after the redesign)
        from vsstreamdiffvsr import Options

        return cls.from_pretrained(model, options=Options(device="cpu", dtype="float32", **opts))
    except ImportError:
        return cls.from_pretrained(model, device="cpu", dtype=torch.float32, **opts)


def filter_case(model: Path) -> dict[str, str]:
    import numpy as np
    import vapoursynth as vs

    import vsstreamdiffvsr
    from tests.vsclips import make_source

    vs.core.num_threads = 4
    clip = vsstreamdiffvsr.upscale(make_source(34, 32, 10, cuts={6}), model_dir=str(model), device="cpu")
    order = list(range(10))
    random.Random(3).shuffle(order)

    def get(n: int) -> bytes:
        f = clip.get_frame(n)
        return b"".join(np.asarray(f[p]).tobytes() for p in range(3))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        frames = dict(zip(order, pool.map(get, order)))
    return {"upscale/shuffled": _sha(b"".join(frames[n] for n in range(10)))}


def vspipe_case(model: Path, tmp: Path) -> dict[str, str]:
    script = tmp / "digest.vpy"
    script.write_text(VPY.format(repo=str(REPO), model=str(model)))
    exe = Path(sys.executable).parent / "vspipe"
    res = subprocess.run([str(exe), "-r", "4", str(script), "-"], capture_output=True, timeout=600,
                         env={**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    if res.returncode:
        raise SystemExit(res.stderr.decode()[-2000:])
    return {"vspipe": _sha(res.stdout)}


def main() -> None:
    from vsstreamdiffvsr.testing import make_tiny_checkpoint

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_checkpoint(Path(tmp) / "model", seed=0)
        results = {**pipeline_cases(model), **filter_case(model), **vspipe_case(model, Path(tmp))}
    for name, digest in results.items():
        print(f"{name:28s} {digest}")


if __name__ == "__main__":
    main()

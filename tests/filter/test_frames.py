"""Frames <-> tensors, and stdout kept for the video."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import vapoursynth as vs

from vsstreamdiffvsr.errors import NonFiniteInputError
from vsstreamdiffvsr.filter import frames as vsframes

from ..vsclips import make_source


def test_frame_to_lr_clamps_pads_and_checks_on_the_host() -> None:
    f = make_source(34, 33, 1).get_frame(0)
    lr = vsframes.frame_to_lr(f, torch.device("cpu"))
    assert lr.size == (33, 34) and lr.padded == (36, 36)
    assert float(lr.x.max()) <= 1.0 and float(lr.x[0, 0, 0, 0]) == 1.0  # 1.05 clamped
    assert torch.equal(lr.x[..., 33:, :34], lr.x[..., 32:33, :34].expand(-1, -1, 3, -1))  # edge replicated
    bad = f.copy()
    np.asarray(bad[1])[2, 2] = np.inf
    with pytest.raises(NonFiniteInputError):
        vsframes.frame_to_lr(bad, torch.device("cpu"))


@pytest.mark.parametrize("whole_rows", [None, True])
@pytest.mark.parametrize("fmt", [vs.RGBS, vs.RGBH])
def test_output_planes_are_written_in_place_with_padded_rows(fmt: vs.PresetVideoFormat,
                                                             whole_rows: bool | None) -> None:
    """The output is copied from the (cropped) tensor straight into the frame's planes, whose rows VapourSynth
    pads to its alignment (132 samples here): every sample lands where it belongs, rounded to the format, both
    by the strided copy (the CPU's) and by the whole-row copy (a GPU's, forced here)."""
    blank = vs.core.std.BlankClip(format=fmt, width=132, height=20, length=1).get_frame(0)
    assert np.asarray(blank[0]).strides[0] > 132 * blank.format.bytes_per_sample  # the case under test
    hq = torch.rand(1, 3, 24, 136)
    out = vsframes.tensor_to_frame(hq[..., :20, :132], blank, {"_Alpha": 1, "Mine": 7}, whole_rows=whole_rows)
    dtype = np.float16 if fmt == vs.RGBH else np.float32
    for p in range(3):
        assert np.array_equal(np.asarray(out[p]), hq[0, p, :20, :132].numpy().astype(dtype))
    assert np.asarray(blank[0]).max() == 0  # the template is left as it was
    assert out.props["Mine"] == 7 and "_Alpha" not in out.props




def test_stdout_redirect_of_two_nodes_on_two_threads() -> None:
    """Enter A, enter B, leave A, leave B (two upscale() callbacks overlapping): stdout goes to stderr while
    either runs and comes back to itself after both."""
    import sys

    original = sys.stdout
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def node_a() -> None:
        with vsframes.python_stdout_to_stderr():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def node_b() -> None:
        a_in.wait(5)
        with vsframes.python_stdout_to_stderr():
            b_in.set()
            a_out.wait(5)
            seen.append(sys.stdout is sys.stderr)

    threads = [threading.Thread(target=node_a), threading.Thread(target=node_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [True] and sys.stdout is original

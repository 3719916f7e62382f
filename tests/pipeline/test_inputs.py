"""Stage 1: inputs checked once and padded to the model's grid; noise as a pure function of (seed, n)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vsstreamdiffvsr import StreamDiffVSR, StreamState, frame_noise
from vsstreamdiffvsr.errors import NonFiniteInputError
from vsstreamdiffvsr.pipeline import inputs


def test_prepare_copies_checks_and_pads() -> None:
    lq = torch.rand(1, 3, 33, 38)
    frame = inputs.prepare(lq, torch.device("cpu"))
    assert frame.size == (33, 38) and frame.padded == (36, 40) and frame.x.data_ptr() != lq.data_ptr()
    assert torch.equal(frame.x, F.pad(lq, (0, 2, 0, 3), mode="replicate"))
    assert frame.crop(torch.zeros(1, 3, 144, 160)).shape == (1, 3, 132, 152)
    with pytest.raises(NonFiniteInputError):
        inputs.prepare(torch.full((1, 3, 32, 32), float("nan")), torch.device("cpu"))
    with pytest.raises(ValueError, match="at most 4096 px per side"):
        inputs.prepare(torch.zeros(1, 3, 32, 4097), torch.device("cpu"))
    assert inputs.prepare(torch.rand(3, 3, 32, 32), torch.device("cpu"), batch=None).x.shape[0] == 3


def test_planes_are_checked_on_the_host_then_clamped() -> None:
    planes = np.random.default_rng(0).random((3, 34, 35), dtype=np.float32) * 1.2 - 0.1
    frame = inputs.from_planes(planes, torch.device("cpu"))
    assert frame.padded == (36, 36) and float(frame.x.min()) == 0.0 and float(frame.x.max()) == 1.0
    planes[1, 3, 3] = -np.inf
    with pytest.raises(NonFiniteInputError):
        inputs.from_planes(planes, torch.device("cpu"))


def test_noise_shape_and_purity() -> None:
    assert inputs.noise_shape(33, 38, 4) == (1, 4, 36, 40) and inputs.noise_shape(32, 32, 4, batch=3)[0] == 3
    a = frame_noise(0, 5, (1, 4, 8, 8))
    assert torch.equal(a, frame_noise(0, 5, (1, 4, 8, 8))) and not torch.equal(a, frame_noise(0, 6, (1, 4, 8, 8)))
    with pytest.raises(ValueError, match="noise must have shape"):
        inputs.initial_latent((1, 4, 8, 8), torch.device("cpu"), torch.zeros(1, 4, 8, 9), None)


def test_any_size_is_padded_by_the_pipeline_and_cropped_back(pipe: StreamDiffVSR) -> None:
    """33x38 runs as the 36x40 edge-replicated frame, cropped: the filter's rule, now the pipeline's."""
    g = torch.Generator().manual_seed(5)
    frames = [torch.rand(1, 3, 33, 38, generator=g) for _ in range(2)]
    noises = [torch.randn(pipe.noise_shape(33, 38), generator=g) for _ in range(2)]
    s_odd, s_pad = StreamState(), StreamState()
    for f, z in zip(frames, noises):
        odd, s_odd = pipe.process_frame(f, s_odd, noise=z)
        padded, s_pad = pipe.process_frame(F.pad(f, (0, 2, 0, 3), mode="replicate"), s_pad, noise=z)
        assert odd.shape == (1, 3, 132, 152)
        assert torch.equal(odd, padded[..., :132, :152])
    assert s_odd.lr_size == (36, 40)  # the state continues the padded size


def test_the_memory_layout_of_the_input_does_not_change_the_frames(pipe: StreamDiffVSR) -> None:
    """A (1,3,h,w) view of an (h,w,3) image (as ComfyUI's IMAGE gives) runs exactly as a contiguous copy."""
    g = torch.Generator().manual_seed(6)
    hwc = [torch.rand(32, 36, 3, generator=g) for _ in range(2)]
    noises = [torch.randn(pipe.noise_shape(32, 36), generator=g) for _ in range(2)]
    outs = []
    for make in (lambda t: t.permute(2, 0, 1)[None], lambda t: t.permute(2, 0, 1)[None].contiguous()):
        state, got = StreamState(), []
        for img, z in zip(hwc, noises):
            hq, state = pipe.process_frame(make(img), state, noise=z)
            got.append(hq)
        outs.append(got)
    assert all(torch.equal(a, b) for a, b in zip(*outs))

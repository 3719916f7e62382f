"""Golden parity: frame-by-frame process_frame equals the reference's whole-sequence pipeline.

The fixtures were produced by running the reference code (jamichss/Stream-DiffVSR, diffusers 0.27.2,
fp32, CPU) on tiny random checkpoints: see scripts/make_parity_fixtures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vsstreamdiffvsr import StreamDiffVSR, StreamState
from vsstreamdiffvsr.testing import RAFT_FILENAME, make_tiny_checkpoint, state_digest

from .conftest import FIXTURES

CASES = sorted(p.stem.removeprefix("parity_") for p in FIXTURES.glob("parity_*.safetensors"))


def _load(case: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = FIXTURES / f"parity_{case}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def test_fixtures_present() -> None:
    assert len(CASES) >= 2


@pytest.mark.parametrize("case", CASES)
def test_frame_by_frame_matches_reference(case: str, tmp_path: Path) -> None:
    data, meta = _load(case)
    ck = make_tiny_checkpoint(tmp_path / "ck", int(meta["checkpoint_seed"]), **json.loads(meta["overrides"]))
    digests = json.loads(meta["digests"])
    for comp in ("unet", "controlnet", "vae"):
        assert state_digest(load_file(str(ck / comp / "diffusion_pytorch_model.safetensors"))) == digests[comp], comp
    assert state_digest(load_file(str(ck / "text_encoder" / "model.safetensors"))) == digests["text_encoder"]
    raft = torch.load(str(ck / "raft" / RAFT_FILENAME), map_location="cpu", weights_only=True)
    assert state_digest(raft) == digests["raft"]

    pipe = StreamDiffVSR.from_pretrained(ck, device="cpu", dtype=torch.float32)
    assert pipe.timesteps == json.loads(meta["timesteps"]) == [999, 749, 499, 249]

    frames = data["lq_uint8"]
    state = StreamState()
    errors = []
    for i in range(frames.shape[0]):
        lq = frames[i].permute(2, 0, 1)[None].float() / 255.0
        hq, state = pipe.process_frame(lq, state, noise=data["noise"][i:i + 1])
        assert hq.shape == data["hq"][i:i + 1].shape
        errors.append(float((hq - data["hq"][i:i + 1]).abs().max()))
    print(f"{case}: max abs error per frame {errors}")
    assert max(errors) <= 1e-4, errors
    # the carried tensor is the raw, unclamped decoder output
    assert state.prev_hq is not None
    assert float((state.prev_hq - data["raw_last"]).abs().max()) <= 1e-4


def test_parity_detects_a_deviation(tmp_path: Path) -> None:
    """Sanity check of the harness: carrying the 8-bit output instead of the raw decoder tensor
    (what a port that re-reads its output frames does) is caught."""
    data, meta = _load(CASES[0])
    ck = make_tiny_checkpoint(tmp_path / "ck", int(meta["checkpoint_seed"]), **json.loads(meta["overrides"]))
    pipe = StreamDiffVSR.from_pretrained(ck, device="cpu", dtype=torch.float32)

    def worst_error(quantize_carried: bool) -> float:
        state, worst = StreamState(), 0.0
        for i in range(data["lq_uint8"].shape[0]):
            lq = data["lq_uint8"][i].permute(2, 0, 1)[None].float() / 255.0
            hq, state = pipe.process_frame(lq, state, noise=data["noise"][i:i + 1])
            if quantize_carried:
                as_8bit = ((state.prev_hq / 2 + 0.5).clamp(0, 1) * 255).round() / 255 * 2 - 1
                state = StreamState(as_8bit, state.prev_lq, state.frame_count)
            worst = max(worst, float((hq - data["hq"][i:i + 1]).abs().max()))
        return worst

    exact, deviated = worst_error(False), worst_error(True)
    assert deviated > 10 * exact, (exact, deviated)

#!/usr/bin/env python3
"""Floating-point work of one warm Stream-DiffVSR frame, by component, at a given LR size.

    python scripts/flops.py --lr 320x180     # 1280x720 out
    python scripts/flops.py --lr 480x270     # 1920x1088 out

Counts multiply-adds as 2 FLOPs with torch's FlopCounterMode on the full-size architecture built on the
meta device (shapes only: no weights, no memory, seconds on a CPU). A warm frame runs ARTG's condition
embedding once, 4 x (ControlNet + U-Net), the TPM encoder, the decoder, and RAFT for the next pair (one
new frame encoded, the other's features kept). The reference executes the embedding at each of the 4
steps and encodes both frames of every pair. Divide by a measured time (scripts/bench.py) for the rate a
GPU achieves: convolutions, matmuls and attention are counted; elementwise work and memory traffic are
not, so this is a floor, not a forecast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import FULL_UNET, FULL_VAE, BenchError, parse_lr  # noqa: E402

from vsstreamdiffvsr.models.flow import RaftFlow, bicubic_x4  # noqa: E402
from vsstreamdiffvsr.pipeline.components import split_cond_embedding  # noqa: E402


def tflop(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e12


def count(w: int, h: int) -> dict[str, float]:
    """TFLOP of each component for an LR frame of w x h (the latent's size; output 4w x 4h)."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torchvision.models.optical_flow import raft_large

    from vsstreamdiffvsr.models.temporal_vae import TemporalTinyVAE

    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_UNET).eval()
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(64, 128, 256)).eval()
        vae = TemporalTinyVAE(**FULL_VAE).eval()
        raft = RaftFlow(raft_large(weights=None).eval())
        embedding = split_cond_embedding(controlnet)
        inp, t, prompt = torch.empty(1, 7, h, w), torch.tensor(999), torch.empty(1, 77, 1024)
        warped, latent, lq = torch.empty(1, 3, 4 * h, 4 * w), torch.empty(1, 4, h, w), torch.empty(1, 3, h, w)
    assert embedding is not None
    cond = embedding(warped)
    down, mid = controlnet(inp, t, encoder_hidden_states=prompt, controlnet_cond=cond, return_dict=False)
    feats = vae.temporal_features(warped)
    hr = bicubic_x4(lq)
    kept = raft.encode(hr)
    return {
        "ARTG condition embedding": tflop(lambda: embedding(warped)),
        "ControlNet step (embedding split off)": tflop(
            lambda: controlnet(inp, t, encoder_hidden_states=prompt, controlnet_cond=cond, return_dict=False)),
        "U-Net step": tflop(lambda: unet(inp, t, encoder_hidden_states=prompt, down_block_additional_residuals=down,
                                         mid_block_additional_residual=mid)),
        "TPM encoder": tflop(lambda: vae.temporal_features(warped)),
        "decoder with TPM": tflop(lambda: vae.decode(latent, feats)),
        "RAFT feature encoder, one frame": tflop(lambda: raft.encode(hr)),
        "RAFT flow, previous features kept": tflop(
            lambda: raft.flow_and_features(hr, hr, corr="full", previous_features=kept)),
    }


#: calls per warm frame: (ours, the reference's)
CALLS = {
    "ARTG condition embedding": (1, 4),
    "ControlNet step (embedding split off)": (4, 4),
    "U-Net step": (4, 4),
    "TPM encoder": (1, 1),
    "decoder with TPM": (1, 1),
    "RAFT feature encoder, one frame": (0, 1),  # the previous frame's features, kept by us
    "RAFT flow, previous features kept": (1, 1),
}
DENOISE_DECODE = ("ARTG condition embedding", "ControlNet step (embedding split off)", "U-Net step", "TPM encoder",
                  "decoder with TPM")


def totals(c: dict[str, float]) -> dict[str, float]:
    """TFLOP per warm frame: denoise + decode, the whole frame, and the frame as the reference executes it."""
    return {"denoise + decode": sum(CALLS[k][0] * c[k] for k in DENOISE_DECODE),
            "frame": sum(n * c[k] for k, (n, _) in CALLS.items()),
            "frame as the reference executes it": sum(n * c[k] for k, (_, n) in CALLS.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", default="320x180", help="LR input WxH (output is 4x)")
    args = ap.parse_args()
    try:
        w, h = parse_lr(args.lr)
    except BenchError as exc:
        ap.exit(2, f"flops.py: error: {exc}\n")
    w, h = w + -w % 4, h + -h % 4  # as the pipeline pads
    c = count(w, h)
    print(f"# {w}x{h} -> {4 * w}x{4 * h}: TFLOP per warm frame (FlopCounterMode, meta device)")
    print("| component | TFLOP per call | calls per frame (ours / reference) | TFLOP per frame (ours) |")
    print("|---|---|---|---|")
    for name, value in c.items():
        ours, ref = CALLS[name]
        print(f"| {name} | {value:.3f} | {ours} / {ref} | {ours * value:.3f} |")
    for name, value in totals(c).items():
        print(f"| **{name}** | | | **{value:.2f}** |")


if __name__ == "__main__":
    main()

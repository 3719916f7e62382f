#!/usr/bin/env python3
"""Regenerate tests/fixtures/parity_*.safetensors by running the *reference* Stream-DiffVSR code.

Run it with a Python that has the reference stack (Python 3.11, torch 2.14.1, torchvision 0.29.1,
diffusers==0.27.2, huggingface_hub==0.25.2, transformers==4.46.3, numpy<2, accelerate, safetensors,
pillow, matplotlib) and a checkout of github.com/jamichss/Stream-DiffVSR:

    ref-venv/bin/python scripts/make_parity_fixtures.py --upstream /path/to/Stream-DiffVSR

For each case it writes a tiny random checkpoint with ``vsstreamdiffvsr.testing.make_tiny_checkpoint``
(seeded, identical on any library version), builds the reference ``StreamDiffVSRPipeline`` from those
files with its own constructor, and runs the whole sequence at once, exactly as the reference's
``inference.py`` does (fp32, ``guidance_scale=0``, 4 steps, torchvision RAFT as ``of_model``), except
that the prompt embedding is passed in (computed by the tiny CLIP text encoder on the fixed empty-prompt
ids) and the noise comes from a CPU generator. The fixture stores the 8-bit LR frames, the noise the
reference drew for every frame, its clamped outputs, its raw decoder outputs, and digests of the
checkpoint so that a test can tell "checkpoint differs" from "pipeline differs".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# name -> (checkpoint seed, LR height, width, frames, motion, noise seed, config overrides)
CASES = {
    "pan": dict(seed=0, h=32, w=36, frames=4, motion="pan", noise_seed=0, overrides={}),
    "zoom": dict(seed=1, h=36, w=32, frames=4, motion="zoom", noise_seed=7,
                 overrides={"vae": {"decoder_block_out_channels": [8, 8, 8], "encoder_block_out_channels": [8, 8, 8],
                                    "block_out_channels": [8, 8, 8]}}),
}


def make_frames(h: int, w: int, n: int, motion: str, seed: int) -> np.ndarray:
    """(n, h, w, 3) uint8 frames of a smooth random texture under a known motion."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1000 + seed)
    tex = torch.rand(1, 3, h // 4 + 8, w // 4 + 8, generator=g)
    tex = F.interpolate(tex, size=(3 * h, 3 * w), mode="bicubic", align_corners=False)
    tex = tex + 0.15 * torch.rand(1, 3, 3 * h, 3 * w, generator=g)
    frames = []
    for i in range(n):
        if motion == "pan":
            theta = torch.tensor([[[1 / 3, 0.0, 0.03 * i], [0.0, 1 / 3, -0.02 * i]]])
        else:  # zoom with a little rotation
            s = (1 / 3) * (1 - 0.04 * i)
            a = 0.03 * i
            theta = torch.tensor([[[s * np.cos(a), -s * np.sin(a), 0.0], [s * np.sin(a), s * np.cos(a), 0.0]]],
                                 dtype=torch.float32)
        grid = F.affine_grid(theta, (1, 3, h, w), align_corners=False)
        fr = F.grid_sample(tex, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        frames.append((fr.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    return np.stack(frames)


def run_case(name: str, case: dict, upstream: Path, out_dir: Path) -> Path:
    import PIL.Image
    from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from torchvision.models.optical_flow import raft_large
    from transformers import CLIPTextModel

    from pipeline.stream_diffvsr_pipeline import StreamDiffVSRPipeline
    from temporal_autoencoder.autoencoder_tiny import TemporalAutoencoderTiny
    from vsstreamdiffvsr.testing import RAFT_FILENAME, make_tiny_checkpoint, state_digest

    with tempfile.TemporaryDirectory() as tmp:
        ck = make_tiny_checkpoint(tmp, case["seed"], **case["overrides"])
        digests = {c: state_digest(load_file(str(ck / c / "diffusion_pytorch_model.safetensors")))
                   for c in ("unet", "controlnet", "vae")}
        digests["text_encoder"] = state_digest(load_file(str(ck / "text_encoder" / "model.safetensors")))
        raft_state = torch.load(str(ck / "raft" / RAFT_FILENAME), map_location="cpu", weights_only=True)
        digests["raft"] = state_digest(raft_state)

        unet = UNet2DConditionModel.from_pretrained(str(ck / "unet")).eval()
        controlnet = ControlNetModel.from_pretrained(str(ck / "controlnet")).eval()
        vae = TemporalAutoencoderTiny.from_pretrained(str(ck / "vae")).eval()
        scheduler = DDIMScheduler.from_pretrained(str(ck / "scheduler"))
        text = CLIPTextModel.from_pretrained(str(ck / "text_encoder")).eval()
        raft = raft_large(weights=None, progress=False)
        raft.load_state_dict(raft_state)
        raft.eval()

        ids = torch.tensor([[49406, 49407] + [0] * 75])
        with torch.no_grad():
            prompt_embeds = text(input_ids=ids).last_hidden_state

        pipe = StreamDiffVSRPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        noises: list[torch.Tensor] = []
        raw: list[torch.Tensor] = []
        orig_prepare, orig_decode = pipe.prepare_latents, vae.decode

        def prepare_latents(*args, **kwargs):
            z = orig_prepare(*args, **kwargs)
            noises.append(z.detach().clone())
            return z

        def decode(*args, **kwargs):
            out = orig_decode(*args, **kwargs)
            raw.append((out[0] if isinstance(out, tuple) else out.sample).detach().clone())
            return out

        pipe.prepare_latents = prepare_latents
        vae.decode = decode

        frames = make_frames(case["h"], case["w"], case["frames"], case["motion"], case["seed"])
        pil = [PIL.Image.fromarray(f) for f in frames]
        with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
            result = pipe(prompt=None, images=pil, prompt_embeds=prompt_embeds, guidance_scale=0,
                          num_inference_steps=4, generator=torch.Generator().manual_seed(case["noise_seed"]),
                          of_model=raft, output_type="pt")
        hq = torch.cat([img if img.dim() == 4 else img[None] for img in result.images]).float()

    assert len(noises) == case["frames"] and len(raw) == case["frames"], (len(noises), len(raw))
    tensors = {
        "lq_uint8": torch.from_numpy(frames).contiguous(),          # (n, h, w, 3)
        "noise": torch.cat(noises).contiguous(),                     # (n, 4, h, w)
        "hq": hq.contiguous(),                                       # (n, 3, 4h, 4w), clamped [0, 1]
        "raw_last": raw[-1].contiguous(),                            # (1, 3, 4h, 4w), unclamped
    }
    meta = {"case": name, "checkpoint_seed": str(case["seed"]), "overrides": json.dumps(case["overrides"]),
            "digests": json.dumps(digests), "timesteps": json.dumps([int(t) for t in scheduler.timesteps]),
            "reference": "jamichss/Stream-DiffVSR pipeline/StreamDiffVSRPipeline, diffusers 0.27.2, fp32, CPU"}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"parity_{name}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="checkout of jamichss/Stream-DiffVSR")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="only these cases (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.upstream.resolve()))
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.case or sorted(CASES):
        path = run_case(name, CASES[name], args.upstream, args.out)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()

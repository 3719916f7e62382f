"""Tiny random Stream-DiffVSR checkpoints in the exact Hugging Face layout, for tests and scripts.

The real weights (about 4 GB) cannot be fetched in CI; these folders exercise the same loader, the same
key names and configs, and the same numerics at toy sizes. Values are drawn from a seeded generator in
sorted key order, independent of library initialisers, so a seed gives the same files with any torch /
diffusers version (the upstream parity fixtures rely on this). Zero-initialised ControlNet projections
and the VAE's ``alpha`` are randomised too, so ARTG and TPM really change the output.

Kept importable on Python 3.11 with diffusers 0.27.2 (the reference stack), since
``scripts/make_parity_fixtures.py`` runs it there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

__all__ = ["make_tiny_checkpoint", "randomize_", "state_digest", "TINY_UNET", "TINY_VAE", "TINY_TEXT"]

TINY_UNET: Dict[str, Any] = {
    "in_channels": 7,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": [True, True, True, False],
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "num_class_embeds": None,
    "upcast_attention": False,
}

TINY_VAE: Dict[str, Any] = {
    "_class_name": "TemporalAutoencoderTiny",
    "_diffusers_version": "0.27.2",
    "act_fn": "relu",
    "block_out_channels": [16, 16, 16],
    "decoder_block_out_channels": [16, 16, 16],
    "encoder_block_out_channels": [16, 16, 16],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 1],
    "num_encoder_blocks": [1, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
}

TINY_TEXT: Dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SCHEDULER_CONFIG: Dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.21.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "timestep_spacing": "trailing",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}

MODEL_INDEX: Dict[str, Any] = {
    "_class_name": "StreamDiffVSRPipeline",
    "_diffusers_version": "0.21.0.dev0",
    "controlnet": ["diffusers", "ControlNetModel"],
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": [None, "TemporalAutoencoderTiny"],
}

RAFT_FILENAME = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, gain: float = 1.0) -> nn.Module:
    """Overwrite every parameter and float buffer with seeded random values, in sorted key order.

    Weights get ``gain / sqrt(fan_in)`` normal values, norm scales ``1 + 0.1 N``, biases ``0.05 N``,
    scalar ``alpha`` values U(0.2, 0.8), BatchNorm running stats sane positive values.
    """
    gen = torch.Generator().manual_seed(seed)
    state = module.state_dict(keep_vars=True)
    for name in sorted(state):
        t = state[name]
        if not t.is_floating_point():
            continue
        shape = tuple(t.shape)
        if name.endswith("running_var"):
            v = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("running_mean"):
            v = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("alpha") and t.dim() == 0:
            v = 0.2 + 0.6 * torch.rand(shape, generator=gen)
        elif t.dim() >= 2:
            fan_in = math.prod(shape[1:])
            v = torch.randn(shape, generator=gen) * (gain / math.sqrt(max(fan_in, 1)))
        elif name.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            v = 0.05 * torch.randn(shape, generator=gen)
        t.data.copy_(v.to(t.dtype))
    return module


def state_digest(state: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and float32 bytes: identifies weights across versions."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.float32).numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
    return h.hexdigest()


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


def _save_text_encoder(model: nn.Module, directory: Path) -> None:
    """``config.json`` + ``model.safetensors`` with the HF checkpoint's ``text_model.`` key prefix.

    (transformers 5 dropped that prefix from the module tree; the published checkpoint has it.)
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        state[k if k.startswith("text_model.") else "text_model." + k] = v.detach().contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _build_tiny_vae(config: Dict[str, Any]) -> nn.Module:
    # Imported lazily so that this module also loads where only the reference stack is installed.
    from vsstreamdiffvsr.models.temporal_vae import TemporalTinyVAE

    return TemporalTinyVAE.from_config(config)


def make_tiny_checkpoint(directory: "str | os.PathLike[str]", seed: int = 0, *, unet: Dict[str, Any] | None = None,
                         vae: Dict[str, Any] | None = None, text: Dict[str, Any] | None = None,
                         conditioning_channels: Tuple[int, ...] = (16, 32, 64), raft: bool = True) -> Path:
    """Write a random Stream-DiffVSR model folder (HF layout plus ``raft/``) and return its path.

    Args:
        directory: created if needed; existing files are overwritten.
        seed: selects the random weights (same seed, same weights on any torch/diffusers version).
        unet, vae, text: config overrides merged into :data:`TINY_UNET`, :data:`TINY_VAE`, :data:`TINY_TEXT`.
        conditioning_channels: the ControlNet conditioning embedding (2 stride-2 convs: HR -> LR).
        raft: also write a random RAFT-large at ``raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth``.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ucfg = {**TINY_UNET, **(unet or {})}
    vcfg = {**TINY_VAE, **(vae or {})}
    tcfg = {**TINY_TEXT, **(text or {})}

    torch.manual_seed(seed)  # only to make the (overwritten) initialisers quiet and cheap to reason about
    unet_model = randomize_(UNet2DConditionModel(**ucfg), seed * 10 + 1)
    cn_keys = ("in_channels", "down_block_types", "only_cross_attention", "block_out_channels", "layers_per_block",
               "attention_head_dim", "cross_attention_dim", "norm_num_groups", "use_linear_projection",
               "flip_sin_to_cos", "freq_shift", "num_class_embeds", "upcast_attention")
    controlnet = randomize_(ControlNetModel(conditioning_channels=3,
                                            conditioning_embedding_out_channels=tuple(conditioning_channels),
                                            **{k: ucfg[k] for k in cn_keys}), seed * 10 + 2)
    vae_model = randomize_(_build_tiny_vae(vcfg), seed * 10 + 3)
    with torch.no_grad():  # keep the random decoder's output roughly inside [-1, 1] so clamping hides little
        vae_model.decoder.layers[-1].weight.mul_(0.3)
        vae_model.decoder.layers[-1].bias.add_(0.7)
    text_model = randomize_(CLIPTextModel(CLIPTextConfig(**tcfg)), seed * 10 + 4)

    unet_model.save_pretrained(str(root / "unet"), safe_serialization=True)
    controlnet.save_pretrained(str(root / "controlnet"), safe_serialization=True)
    _write_json(root / "vae" / "config.json", vcfg)
    _save(vae_model, root / "vae" / "diffusion_pytorch_model.safetensors")
    _save_text_encoder(text_model, root / "text_encoder")
    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(root / "model_index.json", MODEL_INDEX)
    if raft:
        from torchvision.models.optical_flow import raft_large

        raft_model = randomize_(raft_large(weights=None, progress=False), seed * 10 + 5, gain=0.5)
        (root / "raft").mkdir(exist_ok=True)
        torch.save(raft_model.state_dict(), str(root / "raft" / RAFT_FILENAME))
    return root

"""Stage 0, load: the networks of one model folder on one device, in the precisions asked for.

:class:`Components` is plain data: the diffusers U-Net and ControlNet (its conditioning embedding taken out, to
run once per frame), the temporal tiny VAE, RAFT per network precision, the DDIM scheduler set to the 4
inference steps and the cached empty-prompt embedding. Nothing here runs a frame.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..models.flow import RaftFlow

__all__ = ["Components", "load_components", "split_cond_embedding", "NUM_INFERENCE_STEPS"]

NUM_INFERENCE_STEPS = 4


@dataclass
class Components:
    """The loaded networks of one model (shared by every view of it)."""

    unet: torch.nn.Module
    controlnet: torch.nn.Module
    #: the ControlNet's conditioning embedding, run once per frame (None: it stays inside the ControlNet)
    cond_embedding: torch.nn.Module | None
    vae: torch.nn.Module
    #: RAFT by the precision of its networks; float32 (the reference) always present
    rafts: dict[torch.dtype, RaftFlow]
    scheduler: Any
    #: the empty prompt's text embedding (1, 77, D) in the U-Net's precision, and as loaded (float32)
    prompt_embeds: torch.Tensor
    prompt_fp32: torch.Tensor
    dtype: torch.dtype
    vae_dtype: torch.dtype
    device: torch.device
    channels_last: bool
    #: the model folder these came from (None: built in memory), for the float32 copy of the NaN fallback
    model_dir: str | None = None
    timesteps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scheduler.set_timesteps(NUM_INFERENCE_STEPS)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def raft(self, dtype: torch.dtype) -> RaftFlow:
        """RAFT with its networks in ``dtype``; a half-precision copy (10 MB) is made on first request. Ask for the
        precisions a pipeline may use before frames run (:meth:`prepare_raft`): a cast queued on first use could
        race with a flow computed ahead on a side stream."""
        net = self.rafts.get(dtype)
        if net is None:
            with torch.inference_mode(False):
                net = self.rafts[dtype] = self.rafts[torch.float32].with_dtype(dtype)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return net

    def float32(self) -> "Components":
        """A float32 copy of the U-Net, ControlNet, embedding and (if half) VAE for the NaN fallback; RAFT, the
        scheduler and float32 parts are shared. Reloaded from the folder when there is one (no half-precision
        round trip), else converted."""
        half_vae = self.vae_dtype != torch.float32
        if self.model_dir is not None:
            from .. import weights

            root = weights.resolve_model_dir(self.model_dir)
            unet, controlnet = weights.load_unet(root, torch.float32), weights.load_controlnet(root, torch.float32)
            embedding = split_cond_embedding(controlnet)
            vae = weights.load_vae(root, torch.float32) if half_vae else self.vae
        else:
            unet, controlnet = copy.deepcopy(self.unet).float(), copy.deepcopy(self.controlnet).float()
            embedding = None if self.cond_embedding is None else copy.deepcopy(self.cond_embedding).float()
            vae = copy.deepcopy(self.vae).float() if half_vae else self.vae
        fmt = self.memory_format
        return replace(self, unet=unet.to(self.device, memory_format=fmt),
                       controlnet=controlnet.to(self.device, memory_format=fmt),
                       cond_embedding=None if embedding is None else embedding.to(self.device, memory_format=fmt),
                       vae=vae.to(self.device, memory_format=fmt), prompt_embeds=self.prompt_fp32,
                       dtype=torch.float32, vae_dtype=torch.float32)


def load_components(model_dir: str | os.PathLike[str] | None, device: torch.device, dtype: torch.dtype,
                    vae_dtype: torch.dtype, channels_last: bool) -> Components:
    """Validate the folder, then load RAFT (small, first) and the diffusion networks onto ``device``."""
    from .. import weights

    root = weights.validate_model_dir(model_dir, need_raft=False)
    raft = weights.load_raft(root).to(device)
    unet, controlnet = weights.load_unet(root, dtype), weights.load_controlnet(root, dtype)
    vae, scheduler = weights.load_vae(root, vae_dtype), weights.load_scheduler(root)
    prompt = weights.empty_prompt_embedding(root)
    return assemble(unet=unet, controlnet=controlnet, vae=vae, raft=raft, scheduler=scheduler, prompt_embeds=prompt,
                    device=device, dtype=dtype, channels_last=channels_last, model_dir=str(root))


def assemble(*, unet: torch.nn.Module, controlnet: torch.nn.Module, vae: torch.nn.Module, raft: RaftFlow,
             scheduler: Any, prompt_embeds: torch.Tensor, device: torch.device, dtype: torch.dtype,
             channels_last: bool, model_dir: str | None = None) -> Components:
    """:class:`Components` from networks already built (moved to ``device``; the embedding taken out)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(device, memory_format=fmt)
    controlnet = controlnet.to(device, memory_format=fmt)
    embedding = split_cond_embedding(controlnet)
    raft = raft.to(device)
    return Components(unet=unet, controlnet=controlnet, cond_embedding=embedding,
                      vae=vae.to(device, memory_format=fmt), rafts={raft.compute_dtype: raft},
                      scheduler=scheduler, prompt_embeds=prompt_embeds.to(device=device, dtype=dtype),
                      prompt_fp32=prompt_embeds.to(device=device, dtype=torch.float32), dtype=dtype,
                      vae_dtype=next(vae.parameters()).dtype, device=device, channels_last=channels_last,
                      model_dir=model_dir)


def split_cond_embedding(controlnet: torch.nn.Module) -> torch.nn.Module | None:
    """Take the conditioning embedding out of a diffusers ControlNet, to run it once per frame; returns it.

    The ControlNet embeds its condition (the warped previous frame, at HR) at every call, and the reference
    calls it at each of the 4 steps with the same condition. The embedding is replaced by an identity and run
    once per frame by the denoiser: the same numbers, three fewer HR passes. Left in place (None returned) for
    a model whose condition is flipped to BGR before embedding.
    """
    embedding = getattr(controlnet, "controlnet_cond_embedding", None)
    config = getattr(controlnet, "config", None)
    order = getattr(config, "controlnet_conditioning_channel_order", "rgb")
    if embedding is None or isinstance(embedding, torch.nn.Identity) or order != "rgb":
        return None
    controlnet.controlnet_cond_embedding = torch.nn.Identity()
    return embedding


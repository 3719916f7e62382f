"""Stage 3, denoise and decode: ARTG's conditioning embedding of the warped previous output (once per frame), the 4
DDIM steps (cold: U-Net alone; warm: with the ControlNet's residuals), TPM features, and the tiny-VAE decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..options import Options
from . import compiling
from .compiling import check_compiler, compile_cache, compiled
from .components import Components
from .model import Model

__all__ = ["Denoiser"]


class Denoiser:
    """Latent noise + LR frame (+ warped previous output) -> raw HR output (B,3,4h,4w), float32, unclamped.

    Tensors carry a batch dimension of independent streams. With ``options.compiled`` the warm step, the
    embedding, the TPM encoder and the warm decoder are compiled (static shapes); cold frames, one per start,
    seek or scene cut, stay eager, which halves the first run's compile time.
    """

    def __init__(self, model: Model, options: Options, components: Components | None = None) -> None:
        self.c = components or model.components
        self.fmt = self.c.memory_format
        self.step_cold: Callable[..., torch.Tensor] = self._step_cold
        self.step_warm: Callable[..., torch.Tensor] = self._step_warm
        self.decode_warm: Callable[..., torch.Tensor] = self.c.vae.decode
        self.features: Callable[[torch.Tensor], Any] = self.c.vae.temporal_features
        self.embed: Callable[[torch.Tensor], torch.Tensor] = self.c.cond_embedding or _unchanged
        self._t = [torch.tensor(t, dtype=torch.long, device=self.c.device) for t in self.c.timesteps]
        if options.compiled and components is None:  # the float32 copy of the NaN fallback runs eagerly
            backend = compiling.BACKEND
            check_compiler(self.c.device, backend)
            compile_cache(options.compile_cache_dir)
            fns = {"step_warm": self._step_warm, "decode_warm": self.c.vae.decode,
                   "features": self.c.vae.temporal_features}
            if self.c.cond_embedding is not None:
                fns["embed"] = self.c.cond_embedding
            key = ("denoise", options.compile_mode, backend)
            made = model.compiled_set(key, lambda: compiled(fns, what="the denoising", off="compile=False",
                                                            mode=options.compile_mode, backend=backend,
                                                            graphs=options.uses_cuda_graphs))
            for name, fn in made.items():
                setattr(self, name, fn)

    def _prompt(self, batch: int) -> torch.Tensor:
        p = self.c.prompt_embeds
        return p if batch == 1 else p.expand(batch, -1, -1)

    def _step_cold(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([z.to(self.c.dtype), x], dim=1)
        return self.c.unet(inp, t, encoder_hidden_states=self._prompt(inp.shape[0]), return_dict=False)[0]

    def _step_warm(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One warm step; ``cond`` is the conditioning *embedding* of the warped frame."""
        inp = torch.cat([z.to(self.c.dtype), x], dim=1)
        prompt = self._prompt(inp.shape[0])
        down, mid = self.c.controlnet(inp, t, encoder_hidden_states=prompt, controlnet_cond=cond,
                                      conditioning_scale=1.0, guess_mode=False, return_dict=False)
        return self.c.unet(inp, t, encoder_hidden_states=prompt, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid, return_dict=False)[0]

    def embedding(self, warped: torch.Tensor) -> torch.Tensor:
        """ARTG's conditioning embedding of the warped previous output (HR in, LR-sized out)."""
        return self.embed(warped.to(self.c.dtype).contiguous(memory_format=self.fmt))

    def denoise(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """The 4 DDIM steps on float32 ``z`` (v-prediction, trailing timesteps); ``warped`` None: a cold frame.
        ``cond``: the embedding of ``warped`` when already made (in tiles)."""
        x_in = x.to(self.c.dtype).contiguous(memory_format=self.fmt)
        if cond is None and warped is not None:
            cond = self.embedding(warped)  # the same at all 4 steps: made once
        for t, t_dev in zip(self.c.timesteps, self._t):
            v = self.step_cold(z, x_in, t_dev) if cond is None else self.step_warm(z, x_in, t_dev, cond)
            z = self.c.scheduler.step(v.float(), t, z, eta=0.0).prev_sample
        return z

    def decode(self, latent: torch.Tensor, feats: Any) -> torch.Tensor:
        """The tiny-VAE decoder, with TPM when ``feats`` is given (cold frames decode eagerly)."""
        return (self.decode_warm if feats is not None else self.c.vae.decode)(latent.to(self.c.vae_dtype), feats)

    def tpm_features(self, warped: torch.Tensor) -> Any:
        return self.features(warped.to(self.c.vae_dtype))

    def __call__(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None) -> torch.Tensor:
        """TPM features of ``warped``, 4 DDIM steps, decode: raw y as float32 (CUDA-graph outputs come back as
        copies, so y is safe to carry)."""
        if warped is None:
            return self.decode(self.denoise(z, x, None), None).float()
        feats = self.tpm_features(warped)
        return self.decode(self.denoise(z, x, warped), feats).float()


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x

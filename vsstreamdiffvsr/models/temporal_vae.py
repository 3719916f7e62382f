"""The temporal tiny VAE of Stream-DiffVSR (a TAESD x4 derivative with temporal fusion).

State-dict compatible with the checkpoint file ``vae/diffusion_pytorch_model.safetensors``: the module
names (``encoder.layers.{i}``, ``decoder.layers.{i}``, ``conv``, ``alpha``, ``temporal_processor``) are
the checkpoint's keys. The model is built from ``vae/config.json``.

Numerics follow the reference exactly:

* every block computes ``c = conv(x)``; with features of the warped previous frame (``prev``) the
  temporal processing module (TPM) adds ``0.1 * upsample(alpha * o[:hw] + (1 - alpha) * o[hw:])``
  where ``o = temporal_processor(cat(flatten(pool4(c)), flatten(pool4(prev))))``;
  the block returns ``relu(c + x)``;
* the encoder is used only for TPM features: its layers run on the raw [-1, 1] tensor (without the
  [-1,1] -> [0,1] shift its latent path would apply) and the output of every block is collected;
* the decoder computes ``tanh(z / 3) * 3``, its layers, then ``* 2 - 1``; decoder block ``k`` receives
  encoder feature ``k`` counted from the deepest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TemporalTinyBlock", "TemporalTinyEncoder", "TemporalTinyDecoder", "TemporalTinyVAE", "VAEConfigError"]

_TPM_POOL = 4
_TPM_GAIN = 0.1


class VAEConfigError(ValueError):
    """``vae/config.json`` describes a network this architecture cannot build."""


def _activation(name: str) -> nn.Module:
    table = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU}
    try:
        return table[name.lower()]()
    except KeyError:
        raise VAEConfigError(f"unsupported act_fn {name!r} (expected one of {sorted(table)})") from None


class TemporalTinyBlock(nn.Module):
    """Residual conv block with the temporal processing module (TPM).

    Checkpoint keys: ``conv.{0,2,4}.*``, ``alpha``, ``temporal_processor.{0,2}.*``.
    """

    def __init__(self, channels: int, act_fn: str) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            _activation(act_fn),
            nn.Conv2d(channels, channels, 3, padding=1),
            _activation(act_fn),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.temporal_processor = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=1),
            _activation(act_fn),
            nn.Conv1d(channels, channels, 3, padding=1),
        )

    def tpm(self, current: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """The fused temporal term, already upsampled to ``current``'s size (before the 0.1 gain)."""
        b, c, h, w = current.shape
        if prev.shape != current.shape:
            raise ValueError(f"TPM feature shape {tuple(prev.shape)} does not match block shape {tuple(current.shape)}")
        pooled_cur = F.avg_pool2d(current, _TPM_POOL, _TPM_POOL)
        pooled_prev = F.avg_pool2d(prev, _TPM_POOL, _TPM_POOL)
        ph, pw = pooled_cur.shape[-2:]
        hw = ph * pw
        # One 1-D sequence: current tokens then previous tokens; the conv runs across the seam.
        seq = torch.cat([pooled_cur.reshape(b, c, hw), pooled_prev.reshape(b, c, hw)], dim=2)
        out = self.temporal_processor(seq)
        fused = self.alpha * out[:, :, :hw].reshape(b, c, ph, pw) + (1 - self.alpha) * out[:, :, -hw:].reshape(
            b, c, ph, pw
        )
        return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        current = self.conv(x)
        if prev is not None:
            current = current + _TPM_GAIN * self.tpm(current, prev)
        return F.relu(current + x)


def _check_channels(kind: str, channels: Sequence[int], blocks: Sequence[int]) -> None:
    if len(channels) != len(blocks) or not channels:
        raise VAEConfigError(f"{kind}_block_out_channels and num_{kind}_blocks must be non-empty and of equal length")
    if len(set(channels)) != 1:
        # The reference network keeps the channel count of each level in its down/up convs, so only
        # equal counts give a network whose shapes connect.
        raise VAEConfigError(f"{kind}_block_out_channels must all be equal, got {list(channels)}")
    if any(n < 0 for n in blocks):
        raise VAEConfigError(f"num_{kind}_blocks must be >= 0, got {list(blocks)}")


class TemporalTinyEncoder(nn.Module):
    """``Conv, Block*n0, [Conv s2, Block*ni]..., Conv -> latent``; used for TPM features only."""

    def __init__(self, in_channels: int, latent_channels: int, num_blocks: Sequence[int],
                 block_out_channels: Sequence[int], act_fn: str) -> None:
        super().__init__()
        _check_channels("encoder", block_out_channels, num_blocks)
        layers: list[nn.Module] = []
        for i, (n, ch) in enumerate(zip(num_blocks, block_out_channels, strict=True)):
            if i == 0:
                layers.append(nn.Conv2d(in_channels, ch, 3, padding=1))
            else:
                layers.append(nn.Conv2d(ch, ch, 3, padding=1, stride=2, bias=False))
            layers.extend(TemporalTinyBlock(ch, act_fn) for _ in range(n))
        layers.append(nn.Conv2d(block_out_channels[-1], latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)
        block_ids = [i for i, m in enumerate(self.layers) if isinstance(m, TemporalTinyBlock)]
        self._last_block = block_ids[-1] if block_ids else -1

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every block, shallowest first, computed on the raw [-1, 1] input (no shift)."""
        feats: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if i > self._last_block:
                break  # the latent conv does not contribute features
            x = layer(x)
            if isinstance(layer, TemporalTinyBlock):
                feats.append(x)
        return feats


class TemporalTinyDecoder(nn.Module):
    """``Conv, act, [Block*ni, Upsample, Conv]..., Block*n_last, Conv -> RGB`` with TPM in every block."""

    def __init__(self, latent_channels: int, out_channels: int, num_blocks: Sequence[int],
                 block_out_channels: Sequence[int], upsampling_scaling_factor: int, act_fn: str,
                 upsample_fn: str) -> None:
        super().__init__()
        _check_channels("decoder", block_out_channels, num_blocks)
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, block_out_channels[0], 3, padding=1), _activation(act_fn)]
        last = len(num_blocks) - 1
        for i, (n, ch) in enumerate(zip(num_blocks, block_out_channels, strict=True)):
            layers.extend(TemporalTinyBlock(ch, act_fn) for _ in range(n))
            if i != last:
                layers.append(nn.Upsample(scale_factor=upsampling_scaling_factor, mode=upsample_fn))
            layers.append(nn.Conv2d(ch, ch if i != last else out_channels, 3, padding=1, bias=i == last))
        self.layers = nn.Sequential(*layers)
        self.num_temporal_blocks = sum(isinstance(m, TemporalTinyBlock) for m in self.layers)

    def forward(self, z: torch.Tensor, temporal_features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if temporal_features is not None and len(temporal_features) != self.num_temporal_blocks:
            raise ValueError(
                f"decoder has {self.num_temporal_blocks} blocks but got {len(temporal_features)} temporal features")
        x = torch.tanh(z / 3) * 3
        k = 0
        for layer in self.layers:
            if isinstance(layer, TemporalTinyBlock):
                x = layer(x, None if temporal_features is None else temporal_features[k])
                k += 1
            else:
                x = layer(x)
        return x.mul(2).sub(1)


class TemporalTinyVAE(nn.Module):
    """The temporal-aware tiny autoencoder (reference class ``TemporalAutoencoderTiny``).

    Build with :meth:`from_config` (the parsed ``vae/config.json``); load weights with
    ``load_state_dict``. Only two operations are used by Stream-DiffVSR:

    * :meth:`temporal_features` (warped previous HQ in [-1, 1], (B,3,H,W)) -> list of features,
      deepest first, ready for :meth:`decode`;
    * :meth:`decode` (latent (B,C,h,w), optional features) -> image (B,3,s*h,s*w), nominally [-1, 1],
      not clamped.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3,
                 encoder_block_out_channels: Sequence[int] = (64, 64, 64),
                 decoder_block_out_channels: Sequence[int] = (64, 64, 64), act_fn: str = "relu",
                 upsample_fn: str = "nearest", latent_channels: int = 4, upsampling_scaling_factor: int = 2,
                 num_encoder_blocks: Sequence[int] = (1, 3, 3), num_decoder_blocks: Sequence[int] = (3, 3, 1),
                 scaling_factor: float = 1.0) -> None:
        super().__init__()
        if list(num_encoder_blocks)[::-1] != list(num_decoder_blocks):
            raise VAEConfigError(
                "num_encoder_blocks reversed must equal num_decoder_blocks (each decoder block takes the encoder "
                f"feature at its scale), got {list(num_encoder_blocks)} and {list(num_decoder_blocks)}")
        if len(encoder_block_out_channels) != len(decoder_block_out_channels):
            raise VAEConfigError("encoder and decoder must have the same number of levels")
        if upsample_fn not in ("nearest", "bilinear", "bicubic", "nearest-exact"):
            raise VAEConfigError(f"upsample_fn must be an interpolation mode such as 'nearest', got {upsample_fn!r}")
        if not isinstance(scaling_factor, (int, float)) or isinstance(scaling_factor, bool) or scaling_factor <= 0:
            raise VAEConfigError(f"scaling_factor must be a positive number, got {scaling_factor!r}")
        self.encoder = TemporalTinyEncoder(in_channels, latent_channels, num_encoder_blocks,
                                           encoder_block_out_channels, act_fn)
        self.decoder = TemporalTinyDecoder(latent_channels, out_channels, num_decoder_blocks,
                                           decoder_block_out_channels, upsampling_scaling_factor, act_fn,
                                           upsample_fn)
        self.scaling_factor = float(scaling_factor)
        self.latent_channels = latent_channels
        self.scale = int(upsampling_scaling_factor) ** (len(decoder_block_out_channels) - 1)

    _CONFIG_KEYS = ("in_channels", "out_channels", "encoder_block_out_channels", "decoder_block_out_channels",
                    "act_fn", "upsample_fn", "latent_channels", "upsampling_scaling_factor", "num_encoder_blocks",
                    "num_decoder_blocks", "scaling_factor")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TemporalTinyVAE":
        """Build from a ``vae/config.json`` dict; unknown keys (``_class_name``, ``latent_magnitude``...) are ignored."""
        kwargs = {k: config[k] for k in cls._CONFIG_KEYS if k in config}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # e.g. a list where a number belongs
            raise VAEConfigError(str(exc)) from None

    def temporal_features(self, warped_prev: torch.Tensor) -> list[torch.Tensor]:
        """Encoder block outputs of the warped previous HQ frame, deepest first (decoder order)."""
        return self.encoder.features(warped_prev)[::-1]

    def decode(self, latents: torch.Tensor, temporal_features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Latent -> image in nominal [-1, 1]; TPM is active when ``temporal_features`` is given."""
        return self.decoder(latents / self.scaling_factor, temporal_features)

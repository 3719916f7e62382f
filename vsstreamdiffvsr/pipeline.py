"""StreamDiffVSR: the per-frame Stream-DiffVSR algorithm (nothing VapourSynth-specific here).

One call of :meth:`StreamDiffVSR.process_frame` is one frame of the reference pipeline:

1. ``x = 2 * lq - 1`` (LR, [-1, 1]);
2. warm frames only: flow = RAFT(bicubic_x4(x), bicubic_x4(x_prev)) at HR, ``warped = warp(prev_hq, flow)``,
   TPM features = tiny-VAE encoder blocks of ``warped`` (deepest first);
3. 4 DDIM steps (v-prediction, trailing, t = 999, 749, 499, 249) on ``z`` (noise, (1,4,h,w)):
   U-Net input ``cat(z, x)``; warm frames add the ControlNet (ARTG) residuals computed with
   ``controlnet_cond = warped``; cold frames run the U-Net alone;
4. ``y = decoder(z, TPM features or None)``; ``hq = clamp(y / 2 + 0.5, 0, 1)``; ``y`` (unclamped) is carried.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .models.flow import MIN_FLOW_SIDE, bicubic_x4, warp
from .state import StreamState

__all__ = ["StreamDiffVSR", "MIN_LR_SIDE", "NUM_INFERENCE_STEPS"]

#: The smallest LR side: RAFT runs at 4x and needs 128 px.
MIN_LR_SIDE = MIN_FLOW_SIDE // 4
NUM_INFERENCE_STEPS = 4

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or a name (``"float32"``, ``"bfloat16"``, ``"float16"`` and short forms)."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")


def parse_device(device: torch.device | str) -> torch.device:
    """torch device, checked to exist (a clear error instead of a CUDA init traceback)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available (no GPU, or a CPU-only torch build); pass device='cpu' "
                             "or install torch with CUDA")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"unsupported device {dev}")
    return dev


class StreamDiffVSR:
    """Stream-DiffVSR x4 video super-resolution, one frame at a time.

    Build with :meth:`from_pretrained`; run with :meth:`process_frame`. An instance holds only weights
    (the recurrent state lives in :class:`StreamState`), so one instance serves any number of streams.
    """

    def __init__(self, *, unet: torch.nn.Module, controlnet: torch.nn.Module, vae: torch.nn.Module,
                 scheduler: Any, raft: torch.nn.Module, prompt_embeds: torch.Tensor, device: torch.device,
                 dtype: torch.dtype, num_inference_steps: int = NUM_INFERENCE_STEPS) -> None:
        self.device = device
        self.dtype = dtype
        self.unet = unet.to(device)
        self.controlnet = controlnet.to(device)
        self.vae = vae.to(device)
        self.raft = raft.to(device)
        self.scheduler = scheduler
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps: list[int] = [int(t) for t in self.scheduler.timesteps]
        self._t_tensors = [torch.tensor(t, dtype=torch.long, device=device) for t in self.timesteps]
        self.prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        self.latent_channels = int(self.unet.config.out_channels)
        self.model_dir: str | None = None

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str] | None = None, device: torch.device | str = "cuda",
                        dtype: torch.dtype | str = torch.bfloat16) -> "StreamDiffVSR":
        """Load from a model folder in the Hugging Face layout (see :mod:`vsstreamdiffvsr.weights`).

        Args:
            model_dir: the folder; None means ``$VSSTREAMDIFFVSR_MODEL_DIR`` or the per-user cache.
            device: where to run (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
            dtype: U-Net and ControlNet precision. ``float32`` is the exact reference path; with bfloat16
                or float16 the DDIM maths, the optical flow and the tiny VAE stay in float32.

        Raises:
            ModelFilesError: a file is missing, truncated, corrupt or does not match its config.
            ValueError: a bad device or dtype.
        """
        from . import weights

        dev = parse_device(device)
        dt = parse_dtype(dtype)
        root = weights.validate_model_dir(model_dir)
        pipe = cls(unet=weights.load_unet(root, dt), controlnet=weights.load_controlnet(root, dt),
                   vae=weights.load_vae(root, torch.float32), scheduler=weights.load_scheduler(root),
                   raft=weights.load_raft(root), prompt_embeds=weights.empty_prompt_embedding(root),
                   device=dev, dtype=dt)
        pipe.model_dir = str(root)
        return pipe

    # ---------------------------------------------------------------------------------------- checks
    def _check_lq(self, lq: Any) -> torch.Tensor:
        if not isinstance(lq, torch.Tensor):
            raise ValueError(f"lq must be a torch.Tensor of shape (1,3,h,w), got {type(lq).__name__}")
        if lq.dim() != 4 or lq.shape[0] != 1 or lq.shape[1] != 3:
            raise ValueError(f"lq must have shape (1,3,h,w), got {tuple(lq.shape)}")
        if not lq.is_floating_point():
            raise ValueError(f"lq must be a float tensor in [0,1], got {lq.dtype} (divide 8-bit data by 255)")
        h, w = int(lq.shape[2]), int(lq.shape[3])
        if h % 4 or w % 4:
            raise ValueError(f"lq height and width must be multiples of 4, got {h}x{w} (pad the frame first)")
        if h < MIN_LR_SIDE or w < MIN_LR_SIDE:
            raise ValueError(f"lq must be at least {MIN_LR_SIDE}x{MIN_LR_SIDE} (RAFT needs {MIN_FLOW_SIDE} px "
                             f"at 4x), got {h}x{w}")
        x = lq.to(device=self.device, dtype=torch.float32)
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
        if not (lo_f >= 0.0 and hi_f <= 1.0):  # also catches NaN
            raise ValueError(f"lq values must lie in [0,1], got min {lo_f:.4g}, max {hi_f:.4g} (clamp the input)")
        return x

    def _noise(self, h: int, w: int, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        shape = (1, self.latent_channels, h, w)
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
                got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"noise must have shape {shape}, got {got}")
            return noise.to(device=self.device, dtype=torch.float32)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(self.device)

    # ------------------------------------------------------------------------------------------ steps
    def compute_flow(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """Flow current -> previous at HR, from LR frames in [-1, 1]."""
        return self.raft(bicubic_x4(x), bicubic_x4(x_prev))

    def denoise(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None) -> torch.Tensor:
        """The 4 DDIM steps; ``warped`` None means a cold frame (U-Net alone)."""
        x_in = x.to(self.dtype)
        cond = None if warped is None else warped.to(self.dtype)
        emb = self.prompt_embeds
        for t, t_dev in zip(self.timesteps, self._t_tensors):
            inp = torch.cat([z.to(self.dtype), x_in], dim=1)
            down = mid = None
            if cond is not None:
                down, mid = self.controlnet(inp, t_dev, encoder_hidden_states=emb, controlnet_cond=cond,
                                            conditioning_scale=1.0, guess_mode=False, return_dict=False)
            v = self.unet(inp, t_dev, encoder_hidden_states=emb, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)[0]
            z = self.scheduler.step(v.float(), t, z, eta=0.0).prev_sample
        return z

    @torch.inference_mode()
    def process_frame(self, lq: torch.Tensor, state: StreamState | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, StreamState]:
        """Super-resolve one frame.

        Args:
            lq: (1,3,h,w) float RGB in [0,1] on any device; h, w multiples of 4 and >= 32.
            state: the state returned for the previous frame; None or an empty state is a cold start.
            noise: (1,4,h,w) initial latent; if None it is drawn from ``generator`` (or torch's global RNG).
            generator: a torch.Generator for the noise draw (its device is where the draw happens).

        Returns:
            ``(hq, new_state)``: hq is (1,3,4h,4w) float32 in [0,1] on this pipeline's device.

        Raises:
            ValueError: wrong shape, dtype, range or size, or a frame size different from the state's.
        """
        state = state if state is not None else StreamState()
        if not isinstance(state, StreamState):
            raise ValueError(f"state must be a StreamState, got {type(state).__name__}")
        lq32 = self._check_lq(lq)
        h, w = int(lq32.shape[2]), int(lq32.shape[3])
        if not state.is_cold and state.lr_size != (h, w):
            raise ValueError(f"frame size {h}x{w} differs from the previous frame's {state.lr_size}; "
                             "start a new StreamState() for a new size")
        z = self._noise(h, w, noise, generator)
        x = lq32 * 2.0 - 1.0
        warped = feats = None
        if not state.is_cold:
            assert state.prev_lq is not None and state.prev_hq is not None
            x_prev = state.prev_lq.to(self.device, torch.float32) * 2.0 - 1.0
            flow = self.compute_flow(x, x_prev)
            warped = warp(state.prev_hq.to(self.device, torch.float32), flow)
            feats = self.vae.temporal_features(warped)
        z = self.denoise(z, x, warped)
        y = self.vae.decode(z, feats).float()
        hq = (y / 2 + 0.5).clamp(0, 1)
        return hq, StreamState(prev_hq=y, prev_lq=lq32, frame_count=state.frame_count + 1)

#!/usr/bin/env python3
"""Speed, memory and picture of Stream-DiffVSR paths, side by side in one process.

    python scripts/bench.py --lr 320x180                     # 720p out: the reference and the default path (CUDA)
    python scripts/bench.py --lr 480x270 --compile 0         # 1080p out, eager
    python scripts/bench.py --lr 320x180 --also dtype=bfloat16 --also compile=0 channels_last=0
    python scripts/bench.py --lr 320x180 --rows ours,batch --batch 1,2,4,8   # B streams per call (process_batch)
    python scripts/bench.py --lr 320x180 --rows reference,ours,fp8,frame-graph --compile-mode default
    python scripts/bench.py --model-dir DIR --lr 320x180 --save          # real weights; JSON + table in docs/bench/
    python scripts/bench.py --tiny --device cpu                          # smoke test: tiny model, float32, seconds

Every pipeline option is a flag named after its :class:`vsstreamdiffvsr.Options` field (``--raft-corr half``,
``--compile 0``, ``--no-compile``), read by ``Options.from_strings``: one definition, one check, and the
"ours" row runs exactly ``Options(**flags)``; with no option flags that is ``Options()`` resolved on the device,
what ``upscale(clip)`` gets (on CUDA: float16, compiled with CUDA graphs; on the CPU: float32, eager).

Rows (``--rows``, in this order):
  reference    executes like the reference code: float32 (TF32 matmul/conv on CUDA), eager, NCHW, RAFT at HR
               with the float32 all-pairs correlation and float32 networks, flow in line, cuDNN autotuning off,
               the ControlNet's conditioning embedding run inside each of the 4 steps (``--reference-options``
               changes fields, e.g. ``raft_corr=lean`` at 4K, where the pyramid alone needs 89 GB)
  ours         ``Options(**flags)``; ``--also FIELD=VALUE ...`` adds one more row per use, each from ours
  batch        ours through ``process_batch``: B independent streams advanced one frame per call, for each B of
               ``--batch``: frames per second per GPU (B frames per call / time per call), peak memory, and each
               stream's first ``--check-frames`` outputs against its own ``process_frame`` run (max abs diff)
  fp8          ours with the U-Net's and ControlNet's nn.Linear layers run as float8 (e4m3) matmuls through
               ``torch._scaled_mm`` (per-tensor scales); skipped with the reason where torch or the GPU cannot
  frame-graph  ours (a view of the same model) with the warm frame's denoise + decode replayed as one CUDA graph
               (CUDA only, with --compile 0 or a compile mode without CUDA graphs)
``--inductor KEY=VALUE ...`` / ``--inductor-preset tuned`` set ``torch._inductor.config`` before anything
compiles (e.g. with ``--compile-mode max-autotune``).

Columns: ms/frame (median over --frames after --warmup frames), the cold first frame, the warm-up overhead
(time of the warm-up frames above the median: compile, graph recording, autotuning), peak allocated GPU memory
(whole run, and steady frames), PSNR against the reference's float32 output on the same weights, frames and
noise. Speed does not depend on weight values: random full-size weights (the release's architecture) are
calibrated (:func:`calibrate_random`) so that the PSNR compares pictures with a real range. Tables go to stdout;
progress to stderr; ``--json`` / ``--save`` write the results (atomically, rewritten after every row).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import gc
import inspect
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vsstreamdiffvsr import StreamDiffVSR, StreamState  # noqa: E402
from vsstreamdiffvsr.options import Options, dtype_name, raft_input_size  # noqa: E402

SCHEMA = "vsstreamdiffvsr-bench/2"
#: rows ``--rows`` knows, in the order they run
ROWS = ("reference", "ours", "batch", "fp8", "frame-graph")
#: inductor settings diffusers' speed guide uses for U-Nets (a bench lever, not a product default)
INDUCTOR_PRESETS: dict[str, dict[str, Any]] = {
    "tuned": dict(conv_1x1_as_mm=True, coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True,
                  epilogue_fusion=False),
}
#: fields that say where, not how: left out of row names
_QUIET_FIELDS = ("device", "compile_cache_dir")
#: largest |batched - single| accepted as "the same frame", by U-Net precision (picture values in [0, 1])
BATCH_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}

FULL_UNET = dict(
    in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(True, True, True, False), attention_head_dim=8, cross_attention_dim=1024,
    use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, num_class_embeds=None, norm_num_groups=32,
)
FULL_VAE = dict(encoder_block_out_channels=(64, 64, 64), decoder_block_out_channels=(64, 64, 64),
                num_encoder_blocks=(1, 3, 3), num_decoder_blocks=(3, 3, 1))


class BenchError(Exception):
    """A problem with the bench's inputs: reported as one line."""


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the tables)."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ================================================================================================= weights

def random_full_components(seed: int = 0, init_device: str | torch.device = "cpu") -> dict[str, Any]:
    """Full-size random U-Net / ControlNet / tiny VAE / RAFT (the release's architecture), returned on the CPU.

    ``init_device="cuda"`` draws the random weights on the GPU (seconds instead of a minute of CPU init).
    """
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torchvision.models.optical_flow import raft_large

    from vsstreamdiffvsr.models.flow import RaftFlow
    from vsstreamdiffvsr.models.temporal_vae import TemporalTinyVAE
    from vsstreamdiffvsr.testing import SCHEDULER_CONFIG

    torch.manual_seed(seed)
    with torch.device(init_device):
        unet = UNet2DConditionModel(**FULL_UNET)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(64, 128, 256))
        for p in (list(controlnet.controlnet_down_blocks.parameters())
                  + list(controlnet.controlnet_mid_block.parameters())):
            torch.nn.init.normal_(p, std=0.01)  # zero-initialised in a fresh ControlNet; make it do work
        vae = TemporalTinyVAE(**FULL_VAE)
        raft = raft_large(weights=None, progress=False)
    to_cpu = torch.nn.Module.to  # not diffusers' override, which logs for every cast
    return dict(unet=to_cpu(unet, "cpu").eval(), controlnet=to_cpu(controlnet, "cpu").eval(),
                vae=to_cpu(vae, "cpu").eval(), raft=RaftFlow(to_cpu(raft, "cpu").eval()),
                prompt=torch.randn(1, 77, 1024) * 0.5, scheduler=dict(SCHEDULER_CONFIG),
                vae_config=dict(FULL_VAE))


def load_folder(root: Path) -> dict[str, Any]:
    """The networks of a model folder (the project's loaders), on the CPU in float32."""
    from vsstreamdiffvsr import weights

    weights.validate_model_dir(root, need_raft=False)  # every file checked first; RAFT is checked by loading it
    root = weights.resolve_model_dir(root)
    vae_config = json.loads((root / "vae" / "config.json").read_text())
    return dict(unet=weights.load_unet(root), controlnet=weights.load_controlnet(root), vae=weights.load_vae(root),
                raft=weights.load_raft(root), prompt=weights.empty_prompt_embedding(root),
                scheduler=dict(weights.load_scheduler(root).config), vae_config=vae_config)


def make_frames(n: int, h: int, w: int, seed: int = 0, channels: int = 4
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``n`` LR frames (1,3,h,w) of moving smooth content with grain, in [0, 1], and their latent noise
    (1,channels,ceil4(h),ceil4(w)); on the CPU. Frame i does not depend on ``n``: runs of different lengths
    share their first frames (a reference saved with 24 frames serves a run of 8)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    frames, noises = [], []
    for i in range(n):
        base = 0.5 + 0.4 * torch.sin((xx + 2.0 * i + seed) / 9.0) * torch.cos((yy - i) / 13.0)
        frame = (base[None, None].repeat(1, 3, 1, 1) + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)
        frames.append(frame)
        noises.append(torch.randn(1, channels, h + -h % 4, w + -w % 4, generator=g))
    return frames, noises


def calibrate_random(components: dict[str, Any], h: int = 48, w: int = 64) -> dict[str, Any]:
    """Rescale two output layers of *random* weights so that their picture has a trained model's range.

    Random weights decode to a nearly black frame (measured at full size: two thirds of the pixels clamped
    at 0, the rest averaging 0.004), where a PSNR against float32 compares almost nothing. On one cold frame
    (float32, CPU, ``h`` x ``w`` LR) this scales the U-Net's ``conv_out`` so its prediction has unit spread,
    then sets the decoder's last conv per RGB channel so the picture has mean 0.5 and spread 0.2. The speed is
    unchanged: same shapes, same kernels. Modifies ``components`` in place and returns it.
    """
    frames, noises = make_frames(1, h, w, seed=1)
    cpu = Options(device="cpu", dtype="float32", channels_last=False, oom_fallback=False, prefetch_flow=False)

    def observe(layer: str) -> torch.Tensor:
        pipe = build(components, cpu)
        c = pipe.components
        seen: list[torch.Tensor] = []
        module = c.unet.conv_out if layer == "unet" else c.vae.decoder.layers[-1]
        module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().float()))
        pipe.process_frame(frames[0], StreamState(), noise=noises[0])
        return seen[0]

    with torch.no_grad():
        conv = components["unet"].conv_out
        scale = 1.0 / float(observe("unet").std())
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
        rgb = observe("decoder")  # the decoder's output before its (x * 2 - 1): a picture in [0, 1]
        mean, std = rgb.mean(dim=(0, 2, 3)), rgb.std(dim=(0, 2, 3)).clamp_min(1e-12)
        last = components["vae"].decoder.layers[-1]
        gain = 0.2 / std
        last.weight.mul_(gain.to(last.weight.dtype)[:, None, None, None])
        last.bias.copy_((last.bias - mean) * gain + 0.5)
    return components


def new_weights(device: torch.device, model_dir: Path | None, tiny: bool) -> tuple[dict[str, Any], str]:
    """Weights for the rows: a real model folder as it is, or random (tiny or full-size) weights calibrated by
    :func:`calibrate_random`. Returns (components on the CPU, a description)."""
    if model_dir is not None:
        return load_folder(model_dir), f"model folder {model_dir}"
    if tiny:
        from vsstreamdiffvsr.testing import make_tiny_checkpoint

        with tempfile.TemporaryDirectory() as tmp:  # read into memory, then gone: runs leave nothing behind
            load = load_folder(make_tiny_checkpoint(tmp, seed=0))
        return calibrate_random(load), "tiny random (calibrated)"
    load = random_full_components(init_device=device if device.type == "cuda" else "cpu")
    return calibrate_random(load), "random full-size (calibrated)"


def save_weights(load: dict[str, Any], folder: Path, desc: str, kind: str) -> None:
    """Write components to ``folder`` (safetensors and JSON; nothing pickled) for later processes of one run;
    written beside it and renamed, so a folder that exists is whole."""
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    load["unet"].save_pretrained(str(tmp / "unet"), safe_serialization=True)
    load["controlnet"].save_pretrained(str(tmp / "controlnet"), safe_serialization=True)
    save_file({k: v.contiguous() for k, v in load["vae"].state_dict().items()}, str(tmp / "vae.safetensors"))
    save_file({k: v.contiguous() for k, v in load["raft"].raft.state_dict().items()}, str(tmp / "raft.safetensors"))
    save_file({"prompt": load["prompt"].contiguous()}, str(tmp / "prompt.safetensors"))
    meta = dict(desc=desc, kind=kind, scheduler=_jsonable(load["scheduler"]), vae_config=_jsonable(load["vae_config"]))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder)


def read_weights(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Components written by :func:`save_weights`, on the CPU; and their meta (``desc``, ``kind``)."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file
    from torchvision.models.optical_flow import raft_large

    from vsstreamdiffvsr.models.flow import RaftFlow
    from vsstreamdiffvsr.models.temporal_vae import TemporalTinyVAE

    meta = json.loads((folder / "meta.json").read_text())
    vae = TemporalTinyVAE.from_config(meta["vae_config"])
    vae.load_state_dict(load_file(str(folder / "vae.safetensors")))
    raft = raft_large(weights=None, progress=False)
    raft.load_state_dict(load_file(str(folder / "raft.safetensors")))
    load = dict(unet=UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval(),
                controlnet=ControlNetModel.from_pretrained(str(folder / "controlnet")).eval(),
                vae=vae.eval(), raft=RaftFlow(raft.eval()),
                prompt=load_file(str(folder / "prompt.safetensors"))["prompt"], scheduler=meta["scheduler"],
                vae_config=meta["vae_config"])
    return load, meta


def _jsonable(value: Any) -> Any:
    """Configs (diffusers FrozenDicts, tuples) as plain JSON values."""
    return json.loads(json.dumps(dict(value), default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


# ================================================================================================= building

def reference_options(device: torch.device | str, **changes: Any) -> Options:
    """How the reference code executes (the upstream ``inference.py``), as pipeline options; the embedding
    inside each step is :func:`build`'s ``upstream``."""
    base = Options(device=device, dtype="float32", vae_dtype="float32", raft_dtype="float32", raft_corr="full",
                   compile=False, compile_flow=False, channels_last=False, cudnn_benchmark=False,
                   prefetch_flow=False, oom_fallback=False)
    return dataclasses.replace(base, **changes)


def build(load: dict[str, Any], options: Options, upstream: bool = False) -> StreamDiffVSR:
    """A pipeline over copies of ``load``'s networks with ``options`` (``StreamDiffVSR.from_modules``).

    ``upstream``: execute like the reference code, whose ControlNet embeds its (unchanged) condition again at
    each of the 4 steps (the same numbers; three more HR passes).
    """
    from diffusers import DDIMScheduler

    def copied(name: str) -> Any:
        # a copy (from_modules casts in place), frozen as the project's loaders freeze theirs: in the CUDA-graph
        # modes frames run on a worker thread outside process_frame's inference mode, where parameters that
        # require grad would make every op record autograd and torch.compile trace a training graph
        return copy.deepcopy(load[name]).eval().requires_grad_(False)

    pipe = StreamDiffVSR.from_modules(
        unet=copied("unet"), controlnet=copied("controlnet"), vae=copied("vae"), raft=copied("raft"),
        scheduler=DDIMScheduler.from_config(load["scheduler"]), prompt_embeds=load["prompt"], options=options)
    if upstream:
        c = pipe.components
        if c.cond_embedding is not None:
            c.controlnet.controlnet_cond_embedding, c.cond_embedding = c.cond_embedding, None
            pipe.denoiser.embed = _unchanged  # the ControlNet embeds the warped frame itself, at every step
    return pipe


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


# ------------------------------------------------------------------------------------------------ levers

def fp8_unsupported(device: torch.device) -> str | None:
    """Why float8 matmuls cannot run here (None: they can): torch ships ``torch._scaled_mm`` and the e4m3 type,
    and on CUDA a GPU of compute capability 8.9 or newer (Ada, Hopper); a tiny product is tried."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm / float8_e4m3fn"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return f"float8 matmuls need compute capability 8.9 or newer (Ada, Hopper); this GPU has {cap}"
    try:
        a = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        b = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        out = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        if float(out[0, 0]) != 32.0:
            return f"torch._scaled_mm gave {float(out[0, 0])} for 32 on this device"
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return f"torch._scaled_mm failed on {device}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None


class Fp8Linear(torch.nn.Module):
    """An nn.Linear run as a float8 (e4m3) matmul: the weight quantised once with one scale, the input per call
    with one scale from its absolute maximum; output in the layer's dtype, bias added after."""

    E4M3_MAX = 448.0

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax().clamp_min(1e-12) / self.E4M3_MAX
        self.register_buffer("w8", (w / scale).to(torch.float8_e4m3fn))  # (out, in): its .t() is column-major
        self.register_buffer("w_scale", scale.reshape(()))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = x2.abs().amax().float().clamp_min(1e-12) / self.E4M3_MAX
        x8 = (x2.float() / x_scale).clamp(-self.E4M3_MAX, self.E4M3_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=x_scale, scale_b=self.w_scale, out_dtype=self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def to_fp8(module: torch.nn.Module) -> int:
    """Replace ``module``'s nn.Linear layers whose sides are multiples of 16 (``_scaled_mm``'s rule) by
    :class:`Fp8Linear`, in place; returns how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(parent, name, Fp8Linear(child))
                swapped += 1
    return swapped


class FrameGraph:
    """The warm frame's denoise + TPM + decode (a :class:`~vsstreamdiffvsr.pipeline.denoise.Denoiser` call)
    replayed as one CUDA graph per frame size: after ``warmup`` eager calls it is captured once with static
    inputs; each later call copies its inputs in, replays, and returns a copy of the output. Cold frames and
    tiles run as before. RAFT stays outside, on its side stream. A bench lever, not a pipeline option."""

    def __init__(self, denoiser: Any, warmup: int = 2) -> None:
        self.den, self.warmup = denoiser, warmup
        self.key: tuple[Any, ...] | None = None
        self.calls, self.graph, self.static, self.out = 0, None, [], None
        self.captures = 0

    def __getattr__(self, name: str) -> Any:  # the tiled runner reads the denoiser's parts
        return getattr(self.den, name)

    def __call__(self, z: torch.Tensor, x: torch.Tensor, warped: torch.Tensor | None) -> torch.Tensor:
        if warped is None or not z.is_cuda:
            return self.den(z, x, warped)
        key = tuple((tuple(t.shape), t.dtype, t.stride()) for t in (z, x, warped))
        if key != self.key:
            self.key, self.calls, self.graph, self.static, self.out = key, 0, None, [], None
        if self.calls < self.warmup:
            self.calls += 1
            return self.den(z, x, warped)
        if self.graph is None:
            self.static = [t.clone() for t in (z, x, warped)]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.den(*self.static)
            self.graph, self.captures = graph, self.captures + 1
        for s, t in zip(self.static, (z, x, warped)):
            s.copy_(t)
        self.graph.replay()
        assert self.out is not None
        return self.out.clone()


def inductor_values(settings: dict[str, Any]) -> dict[str, Any]:
    """``torch._inductor.config`` values from text, each read by its entry's current type; BenchError for an
    unknown entry or a value of the wrong kind (checked before any weights load)."""
    import torch._inductor.config as cfg

    done: dict[str, Any] = {}
    for key, text in settings.items():
        if not hasattr(cfg, key):
            raise BenchError(f"--inductor: torch._inductor.config has no setting {key!r} (torch {torch.__version__})")
        current = getattr(cfg, key)
        low = str(text).strip().lower()
        try:
            if isinstance(text, bool) or not isinstance(text, str):
                value: Any = text
            elif isinstance(current, bool):
                value = {"1": True, "true": True, "0": False, "false": False}[low]
            elif isinstance(current, int):
                value = int(low)
            elif isinstance(current, float):
                value = float(low)
            else:
                value = text
        except (KeyError, ValueError):
            raise BenchError(f"--inductor: {key} takes a {type(current).__name__}, got {text!r}") from None
        done[key] = value
    return done


def apply_inductor(values: dict[str, Any]) -> None:
    """Set ``torch._inductor.config`` entries (:func:`inductor_values`) for this process."""
    import torch._inductor.config as cfg

    for key, value in values.items():
        setattr(cfg, key, value)


# ================================================================================================= measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepared(pipe: StreamDiffVSR, frames: Sequence[torch.Tensor]) -> list[Any]:
    """Frames checked, moved and padded as the filter hands them over (outside the timed region)."""
    from vsstreamdiffvsr.pipeline import inputs

    return [inputs.prepare(f, pipe.device) for f in frames]


def _gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


def measure(pipe: StreamDiffVSR, frames: Sequence[torch.Tensor], noises: Sequence[torch.Tensor], warmup: int
            ) -> dict[str, Any]:
    """Run the frames in order as the filter does: each frame's time is ``process_frame``, with the next frame's
    flow queued on the side stream while it denoises where ``options.prefetch_flow`` asks, from the frame on
    the device to the output on the device. The outputs come back on the CPU under ``"outs"``."""
    device = pipe.device
    cuda = device.type == "cuda"
    h, w = frames[0].shape[-2:]
    if tuple(noises[0].shape) != pipe.noise_shape(h, w):
        raise BenchError(f"noise {tuple(noises[0].shape)} does not fit this model ({pipe.noise_shape(h, w)})")
    lr = _prepared(pipe, frames)
    stats = dict(pipe.stats)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()  # reserved-memory figures start from this row's weights alone
        torch.cuda.reset_peak_memory_stats(device)
    prefetch = pipe.options.prefetch_flow
    state, ticket = StreamState(), None
    times: list[float] = []
    outs, between, peaks, reserved = [], [], [], []
    for i, (f, z) in enumerate(zip(lr, noises)):
        sync(device)
        t0 = time.perf_counter()
        ahead: list[Any] = []
        queue_next = None
        if prefetch and i + 1 < len(lr):
            ready = pipe.inputs_ready()

            def queue_next(i: int = i, ready: Any = ready, after: Any = ticket, ahead: list[Any] = ahead) -> None:
                # as the filter: RAFT of i+1 while i denoises, reusing frame i's features from its own flow
                ahead.append(pipe.prefetch_flow(lr[i + 1].x, lr[i].x, ready=ready, after=after))
        hq, state = pipe.process_frame(f, state, noise=z, flow=ticket, on_enqueued=queue_next)
        sync(device)
        times.append(time.perf_counter() - t0)
        ticket = ahead[0] if ahead else None
        outs.append(hq.float().cpu())
        if cuda:  # held between frames: must not grow with the clip's length
            between.append(_gib(torch.cuda.memory_allocated(device)))
            peaks.append(_gib(torch.cuda.max_memory_allocated(device)))
            reserved.append(_gib(torch.cuda.max_memory_reserved(device)))  # graph pools included
            torch.cuda.reset_peak_memory_stats(device)
    return _timing(times, warmup, cuda, peaks, reserved) | dict(
        outs=outs, allocated_between_frames_gib=between, fallbacks=_fallbacks(pipe, stats))


def _fallbacks(pipe: StreamDiffVSR, before: dict[str, int]) -> dict[str, int]:
    """The pipeline's fallbacks (NaN, out-of-memory, RAFT's) taken since ``before``, a copy of its stats."""
    return {k: v - before.get(k, 0) for k, v in pipe.stats.items() if k.endswith("fallbacks") and v > before.get(k, 0)}


def _timing(times: list[float], warmup: int, cuda: bool, peaks: list[float], reserved: list[float]
            ) -> dict[str, Any]:
    steady = times[warmup:] or times
    median = statistics.median(steady)
    nan = float("nan")
    return dict(ms=1000 * median, first_ms=1000 * times[0], times_ms=[round(1000 * t, 2) for t in times],
                warmup_overhead_s=sum(max(0.0, t - median) for t in times[:warmup]),
                to_steady_s=sum(times[:warmup]), peak_gib=max(peaks) if cuda else nan,
                peak_steady_gib=max(peaks[warmup:] or peaks) if cuda else nan,
                peak_reserved_gib=max(reserved) if cuda else nan, peak_by_frame_gib=peaks)


def measure_batch(pipe: StreamDiffVSR, b: int, n: int, warmup: int, h: int, w: int, check: int) -> dict[str, Any]:
    """``b`` independent streams (their own content and noise) advanced one frame per ``process_batch`` call
    for ``n`` calls; then each stream's first ``check`` frames again through ``process_frame`` alone (the
    batch-1 run), compared with its batched outputs."""
    device = pipe.device
    cuda = device.type == "cuda"
    streams = [make_frames(n, h, w, seed=1000 + s, channels=pipe.latent_channels) for s in range(b)]
    stats = dict(pipe.stats)
    lq = [torch.cat([streams[s][0][i] for s in range(b)]).to(device) for i in range(n)]
    nz = [torch.cat([streams[s][1][i] for s in range(b)]) for i in range(n)]
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    states: list[StreamState | None] = [None] * b
    times: list[float] = []
    kept, peaks, reserved = [], [], []
    for i in range(n):
        sync(device)
        t0 = time.perf_counter()
        hq, states = pipe.process_batch(lq[i], states, noise=nz[i])
        sync(device)
        times.append(time.perf_counter() - t0)
        if i < check:
            kept.append(hq.float().cpu())
        if cuda:
            peaks.append(_gib(torch.cuda.max_memory_allocated(device)))
            reserved.append(_gib(torch.cuda.max_memory_reserved(device)))
            torch.cuda.reset_peak_memory_stats(device)
    del states, hq
    res = _timing(times, warmup, cuda, peaks, reserved)
    single_outs, batched_outs = [], []
    for s in range(b):  # the batch-1 runs
        state = StreamState()
        frames, noises = streams[s]
        for i, f in enumerate(_prepared(pipe, frames[:check])):
            y, state = pipe.process_frame(f, state, noise=noises[i])
            single_outs.append(y.float().cpu())
            batched_outs.append(kept[i][s: s + 1])
    diff = max_err(batched_outs, single_outs) if single_outs else float("nan")
    tol = BATCH_TOLERANCE[pipe.dtype]
    ms = res.pop("ms")
    return res | dict(b=b, ms_per_call=ms, ms=ms / b, fps=1000.0 * b / ms, checked_frames=check * b,
                      max_abs_diff_vs_single=diff, psnr_vs_single=psnr(batched_outs, single_outs) if single_outs
                      else float("nan"), tolerance=tol,
                      within_tolerance=bool(diff <= tol) if single_outs else None,
                      fallbacks=_fallbacks(pipe, stats))


def psnr(outs: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """PSNR in dB over frames of values in [0, 1] (inf where identical)."""
    mse = statistics.fmean(float(((a - b) ** 2).mean()) for a, b in zip(outs, ref))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def max_err(outs: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(outs, ref))


def picture_stats(outs: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean, spread and clamped share of an output: a PSNR is only telling on a picture with range."""
    o = torch.stack(list(outs))
    return dict(mean=round(float(o.mean()), 4), std=round(float(o.std()), 4),
                clamped=round(float(((o <= 0) | (o >= 1)).float().mean()), 4))


# ================================================================================================= describing

def option_changes(options: Options, base: Options) -> dict[str, str]:
    """Fields of ``options`` that differ from ``base`` (where/cache fields left out), as text."""
    out = {}
    for f in dataclasses.fields(Options):
        a, b = getattr(options, f.name), getattr(base, f.name)
        if f.name not in _QUIET_FIELDS and a != b:
            out[f.name] = dtype_name(a) if isinstance(a, torch.dtype) else str(a)
    return out


def row_name(options: Options, extra: str = "") -> str:
    """``default: Options()`` for the defaults on this device, else ``Options(field=value, ...)``."""
    changes = option_changes(options, Options(device=options.device))
    name = "default: Options()" if not changes else "Options(" + ", ".join(f"{k}={v}" for k, v in changes.items()) + ")"
    return name + (f" + {extra}" if extra else "")


def resolved(options: Options, w: int, h: int) -> str:
    """What ``options`` run for LR frames of w x h on their device, in words (the table's notes)."""
    rh, rw = raft_input_size(h + -h % 4, w + -w % 4, options.flow)
    corr = options.corr_for(rh, rw)
    parts = [dtype_name(options.unet_dtype),
             f"compiled ({options.compile_mode})" if options.compiled else "eager",
             "channels_last" if options.nhwc else "NCHW",
             f"RAFT at {options.flow.upper()}, {corr} correlation, {dtype_name(options.raft_dtype_for(rh, rw))} "
             f"networks{', compiled' if options.flow_compiled and corr != 'lean' else ''}",
             "flow computed ahead" if options.prefetch_flow else "flow in line",
             f"cuDNN autotune {'on' if options.autotune else 'off'}"]
    if options.vae_precision != torch.float32:
        parts.append(f"VAE {dtype_name(options.vae_precision)}")
    if options.tile is not None:
        parts.append(f"tile {options.tile[0]}x{options.tile[1]}{' (denoising too)' if options.tile_denoise else ''}")
    return ", ".join(parts)


def _num(value: Any, fmt: str) -> str:
    """A number for the tables; "-" where none was measured (nan, or null once read back from JSON)."""
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    return format(value, fmt)


def frame_table(rows: dict[str, dict[str, Any]], title: str) -> str:
    """Markdown table of single-stream rows; the speed-up is against the row named "reference" (else the first)."""
    lines = [title, "| row | ms/frame (median) | fps | speed-up | cold frame ms | warm-up overhead s (compile, "
                    "graphs, autotune) | peak GiB (whole run) | peak GiB (steady) | PSNR vs fp32 (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = rows.get("reference") or next(iter(rows.values()), None)
    for name, r in rows.items():
        speedup = base["ms"] / r["ms"] if base and r.get("ms") else float("nan")
        lines.append(f"| {name} | {_num(r.get('ms'), '.1f')} | {_num(1000 / r['ms'] if r.get('ms') else None, '.2f')} "
                     f"| {_x(speedup)} | {_num(r.get('first_ms'), '.0f')} | "
                     f"{_num(r.get('warmup_overhead_s'), '.1f')} | {_num(r.get('peak_gib'), '.2f')} | "
                     f"{_num(r.get('peak_steady_gib'), '.2f')} | {_psnr(r)} |")
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    text = _num(ratio, ".2f")
    return text if text == "-" else text + "x"


def _psnr(r: dict[str, Any]) -> str:
    """PSNR cell: "identical" where the output equals the reference's bit for bit (the reference itself)."""
    return "identical" if r.get("max_err_vs_fp32") == 0 else _num(r.get("psnr_vs_fp32"), ".1f")


def batch_table(rows: dict[str, dict[str, Any]], title: str, single_fps: float | None = None) -> str:
    """Markdown table of batched rows: frames per second per GPU and their ratio to B=1 (and to the
    single-stream ``process_frame`` row, ``single_fps``, where given)."""
    lines = [title, "| row | B | ms per call | fps per GPU | x vs B=1 | x vs process_frame | peak GiB (steady) | "
                    "warm-up overhead s | max abs diff vs batch-1 run | PSNR vs batch-1 run (dB) | same frames |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    b1 = next((r for r in rows.values() if r.get("b") == 1), None)
    for name, r in rows.items():
        ratio = r["fps"] / b1["fps"] if b1 and r.get("fps") else float("nan")
        vs_single = r["fps"] / single_fps if single_fps and r.get("fps") else float("nan")
        ok = r.get("within_tolerance")
        same = "not checked" if ok is None else "yes" if ok else f"NO (tolerance {r.get('tolerance')})"
        lines.append(f"| {name} | {r.get('b')} | {_num(r.get('ms_per_call'), '.1f')} | {_num(r.get('fps'), '.2f')} | "
                     f"{_x(ratio)} | {_x(vs_single)} | {_num(r.get('peak_steady_gib'), '.2f')} | "
                     f"{_num(r.get('warmup_overhead_s'), '.1f')} | {_num(r.get('max_abs_diff_vs_single'), '.2g')} | "
                     f"{_num(r.get('psnr_vs_single'), '.1f')} | {same} |")
    return "\n".join(lines)


def render(data: dict[str, Any]) -> str:
    """The markdown of one bench run (what it printed), from its results (also as read back from JSON)."""
    w, h = data["lr"]
    title = (f"### {data['gpu']}: {w}x{h} -> {4 * w}x{4 * h}, {data['weights']} weights, {data['frames']} frames "
             f"(median after {data['warmup']}), torch {data['torch']}")
    rows = data["rows"]
    single = {k: r for k, r in rows.items() if r.get("kind") == "frame"}
    batched = {k: r for k, r in rows.items() if r.get("kind") == "batch"}
    parts = []
    if single:
        parts.append(frame_table(single, title))
    if batched:
        ours = next((r for k, r in single.items() if r.get("role") == "ours"), None)
        parts.append(batch_table(batched, title.replace("### ", "### batched, ", 1),
                                 1000 / ours["ms"] if ours and ours.get("ms") else None))
    notes = [f"- {k}: {r['resolved']}" for k, r in rows.items() if r.get("resolved")]
    notes += [f"- {k}: fallbacks {r['fallbacks']}" for k, r in rows.items() if r.get("fallbacks")]
    notes += [f"- {k}: {w}" for k, r in rows.items() for w in r.get("warnings") or []]
    pic = data.get("picture")
    if pic:
        notes.append(f"- float32 picture: mean {pic['mean']:.3f}, spread {pic['std']:.3f}, {100 * pic['clamped']:.1f}% "
                     "of values clamped to 0 or 1")
    notes += [f"- {n}" for n in data.get("notes", [])]
    return "\n\n".join(parts + (["\n".join(notes)] if notes else []))


def finite(value: Any) -> Any:
    """JSON without NaN/Infinity (strict parsers reject them): null instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename: a file at ``path`` is always whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dump(data: dict[str, Any]) -> str:
    return json.dumps(finite(data), indent=1, default=str, allow_nan=False)


def saved_path(data: dict[str, Any], folder: Path | None = None, tag: str | None = None) -> Path:
    """``docs/bench/<date>-<gpu>-<w>x<h>[-<tag>].json``, with -2, -3... where taken: history is never replaced."""
    folder = folder or REPO / "docs" / "bench"
    gpu = re.sub(r"[^a-z0-9]+", "-", str(data["gpu"]).lower()).strip("-") or "device"
    w, h = data["lr"]
    stem = f"{data['date']}-{gpu}-{w}x{h}" + (f"-{re.sub(r'[^A-Za-z0-9._-]+', '-', tag)}" if tag else "")
    path, n = folder / f"{stem}.json", 2
    while path.exists() or path.with_suffix(".md").exists():
        path, n = folder / f"{stem}-{n}.json", n + 1
    return path


# ================================================================================================= the command

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``bench.py: error: ...``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_docs() -> dict[str, str]:
    """Each Options field's ``#:`` comment (its one-line meaning), for the flags' help."""
    docs: dict[str, str] = {}
    try:
        lines = inspect.getsource(Options).splitlines()
    except (OSError, TypeError):
        return docs
    pending: list[str] = []
    for line in lines:
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
        elif m := re.match(r"(\w+)\s*:", s):
            if pending:
                docs[m.group(1)] = " ".join(pending)
            pending = []
        else:
            pending = []
    return docs


def add_option_flags(ap: argparse.ArgumentParser) -> list[str]:
    """One flag per :class:`Options` field (``--raft-corr``; booleans also bare and as ``--no-...``), each kept
    as the text given; returns the field names."""
    group = ap.add_argument_group("pipeline options (vsstreamdiffvsr.Options fields; unset = the Options default)")
    docs = _field_docs()
    names = []
    for f in dataclasses.fields(Options):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        doc = docs.get(f.name, "").replace("%", "%%")
        help_ = f"{doc} (Options default: {default})"
        if str(f.type).startswith("bool"):
            group.add_argument(flag, dest=f.name, nargs="?", const="1", default=None, metavar="0|1", help=help_)
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const="0",
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar="VALUE", help=help_)
        names.append(f.name)
    return names


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="a model folder (default: random full-size weights)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random test model (smoke tests)")
    ap.add_argument("--lr", default=None, help="LR input WIDTHxHEIGHT, output 4x (default 320x180 on CUDA, 48x32 on "
                                                "the CPU)")
    ap.add_argument("--frames", type=int, default=None, help="frames per row (default 24 on CUDA, 3 on the CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="frames left out of the median (default 4 on CUDA, 1 on "
                                                              "the CPU)")
    ap.add_argument("--rows", default="reference,ours",
                    help=f"rows to run, of {', '.join(ROWS)} (default: %(default)s)")
    ap.add_argument("--also", action="append", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="one more row: ours with these Options fields changed (repeat for more rows)")
    ap.add_argument("--reference-options", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="change the reference row's options (e.g. raft_corr=lean)")
    ap.add_argument("--batch", default="1,2,4,8", help="B values of the batch rows, run in this order (default: "
                                                        "%(default)s)")
    ap.add_argument("--check-frames", type=int, default=None,
                    help="batch row: frames per stream compared with its own batch-1 run (default: 3, at most "
                         "--frames)")
    ap.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings, set before anything compiles")
    ap.add_argument("--inductor-preset", choices=sorted(INDUCTOR_PRESETS),
                    help="named --inductor settings (tuned: " + ", ".join(
                        f"{k}={v}" for k, v in INDUCTOR_PRESETS["tuned"].items()) + ")")
    ap.add_argument("--json", type=Path, help="write the results here (rewritten after every row)")
    ap.add_argument("--save", nargs="?", const="", default=None, metavar="TAG",
                    help="also write docs/bench/<date>-<gpu>-<WxH>[-TAG].json and .md (never replacing a file)")
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)  # device_bench: weights and reference outputs
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # device_bench: weights only
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)  # device_bench: the step's name, for the JSON
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default with --device cpu: 1, a smoke test that stays quick on a busy "
                         "machine, where more threads than free cores ran ~10x slower; else torch's default)")
    ap.add_argument("--debug", action="store_true", help="full tracebacks for failed rows")
    ap.set_defaults(option_fields=add_option_flags(ap))
    return ap


def parse_lr(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` -> (w, h); BenchError otherwise (the pipeline pads sizes that are not multiples of 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise BenchError(f"--lr must be WIDTHxHEIGHT, e.g. 320x180, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def pairs(tokens: Sequence[str], what: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; BenchError naming ``what`` for a token without '='."""
    out = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise BenchError(f"{what} takes FIELD=VALUE items, got {token!r}")
        out[key.strip().replace("-", "_")] = value
    return out


@dataclasses.dataclass
class Plan:
    """A checked command line: what each row runs."""

    device: torch.device
    w: int
    h: int
    frames: int
    warmup: int
    rows: list[str]
    ours: Options
    also: list[Options]
    reference: Options
    batch: list[int]
    inductor: dict[str, Any]
    check_frames: int


def plan(args: argparse.Namespace) -> Plan:
    """Every flag checked before any weights load (minutes on a GPU): BenchError / ValueError with one line."""
    from vsstreamdiffvsr.options import parse_device
    from vsstreamdiffvsr.pipeline.inputs import MAX_LR_SIDE, MIN_LR_SIDE

    given = {name: getattr(args, name) for name in args.option_fields if getattr(args, name) is not None}
    ours = Options.from_strings(given)
    device = parse_device(ours.torch_device)
    ours = dataclasses.replace(ours, device=device)
    cpu = device.type == "cpu"
    w, h = parse_lr(args.lr or ("48x32" if cpu else "320x180"))
    if not (MIN_LR_SIDE <= min(w, h) and max(w, h) <= MAX_LR_SIDE):
        raise BenchError(f"--lr {w}x{h}: LR sides must be {MIN_LR_SIDE} to {MAX_LR_SIDE} px")
    frames = args.frames if args.frames is not None else (3 if cpu else 24)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 4)
    if warmup < 0 or frames - warmup < 1:
        raise BenchError(f"--frames ({frames}) must be larger than --warmup ({warmup}, >= 0): the median is over the "
                         "frames after the warm-up (20 or more for a figure to report)")
    if args.model_dir is not None and args.tiny:
        raise BenchError("--tiny and --model-dir exclude each other")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise BenchError(f"--rows: unknown {unknown or 'empty'}; choose from {', '.join(ROWS)}")
    rows = [r for r in ROWS if r in rows]
    also = [Options.from_strings(pairs(spec, "--also"), base=ours) for spec in args.also]
    if any(o.flow == "lr" for o in [ours, *also]) and min(w, h) < 4 * MIN_LR_SIDE:
        raise BenchError(f"--lr {w}x{h}: flow=lr needs LR sides of at least {4 * MIN_LR_SIDE} px")
    reference = reference_options(device)
    if args.reference_options:
        reference = Options.from_strings(pairs(args.reference_options, "--reference-options"), base=reference)
    try:
        batch = list(dict.fromkeys(int(b) for b in args.batch.split(",") if b.strip()))  # in the order given
    except ValueError:
        raise BenchError(f"--batch must be comma-separated integers, e.g. 1,2,4,8, got {args.batch!r}") from None
    if "batch" in rows and (not batch or min(batch) < 1):
        raise BenchError(f"--batch values must be 1 or more, got {args.batch!r}")
    check = min(3, frames) if args.check_frames is None else args.check_frames
    if not 0 <= check <= frames:
        raise BenchError(f"--check-frames must be 0 to --frames ({frames}), got {check}")
    if "frame-graph" in rows and ours.uses_cuda_graphs:
        raise BenchError("the frame-graph row replays its own CUDA graph: use --compile 0 or a compile mode without "
                         "CUDA graphs (--compile-mode default or max-autotune-no-cudagraphs)")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be 1 or more, got {args.threads}")
    inductor = dict(INDUCTOR_PRESETS.get(args.inductor_preset or "", {}))
    inductor.update(pairs(args.inductor, "--inductor"))
    inductor = inductor_values(inductor)
    return Plan(device, w, h, frames, warmup, rows, ours, also, reference, batch, inductor, check)


class Run:
    """One process's rows: weights once, each row built, measured and freed in turn, results written after each."""

    def __init__(self, args: argparse.Namespace, p: Plan) -> None:
        self.args, self.p = args, p
        self.t0 = time.perf_counter()
        self.notes: list[str] = []
        self.rows: dict[str, dict[str, Any]] = {}
        self.ref_outs: list[torch.Tensor] | None = None
        self.picture: dict[str, float] | None = None
        self.failed = False
        self.gpu = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else "CPU"
        self.load, self.weights_desc = self.weights()
        self.frames, self.noises = make_frames(p.frames, p.h, p.w, channels=int(self.load["unet"].config.out_channels))

    # -- inputs shared by the rows
    def weights(self) -> tuple[dict[str, Any], str]:
        a, p = self.args, self.p
        kind = f"model:{a.model_dir}" if a.model_dir else ("tiny" if a.tiny else "full")
        folder = a.scratch / "weights" if a.scratch else None
        if folder is not None and (folder / "meta.json").exists():
            load, meta = read_weights(folder)
            if meta["kind"] != kind:
                raise BenchError(f"--scratch {a.scratch} holds {meta['kind']} weights, not {kind}: use another folder")
            log(f"weights read from {folder} ({meta['desc']})")
            return load, meta["desc"]
        t = time.perf_counter()
        load, desc = new_weights(p.device, a.model_dir, a.tiny)
        log(f"weights: {desc} ({time.perf_counter() - t:.1f} s)")
        if folder is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            save_weights(load, folder, desc, kind)
        return load, desc

    def ref_path(self) -> Path | None:
        return self.args.scratch / f"reference-{self.p.w}x{self.p.h}.safetensors" if self.args.scratch else None

    def saved_reference(self) -> list[torch.Tensor] | None:
        """The reference outputs an earlier process of this run saved for this size (None: none, or too few)."""
        path = self.ref_path()
        if path is None or not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            n = int(meta.get("frames", 0))
            if n < self.p.frames:
                return None
            outs = [f.get_tensor(str(i)) for i in range(self.p.frames)]
            self.picture = json.loads(meta["picture"]) if "picture" in meta else None
        self.notes.append(f"PSNR against the reference outputs saved by an earlier process ({meta.get('row', '?')})")
        return outs

    def save_reference(self, name: str) -> None:
        path = self.ref_path()
        if path is None or self.ref_outs is None:
            return
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({str(i): t.contiguous() for i, t in enumerate(self.ref_outs)}, str(tmp),
                  metadata=dict(frames=str(len(self.ref_outs)), row=name, picture=json.dumps(self.picture)))
        os.replace(tmp, path)

    # -- rows
    def record(self, name: str, res: dict[str, Any]) -> None:
        outs = res.pop("outs", None)
        if outs is not None:
            res["picture"] = picture_stats(outs)
            ref = self.ref_outs
            res["psnr_vs_fp32"] = psnr(outs, ref) if ref is not None else float("nan")
            res["max_err_vs_fp32"] = max_err(outs, ref) if ref is not None else float("nan")
        res["process_s"] = round(time.perf_counter() - self.t0, 1)
        self.rows[name] = res
        if "fps" in res:
            log(f"{name}: {res['ms_per_call']:.1f} ms per call of {res['b']}, {res['fps']:.2f} fps, max abs diff vs "
                f"batch-1 {res['max_abs_diff_vs_single']:.3g}")
        else:
            log(f"{name}: {res['ms']:.1f} ms/frame, first {res['first_ms']:.0f} ms, warm-up overhead "
                f"{res['warmup_overhead_s']:.1f} s, PSNR {_num(res.get('psnr_vs_fp32'), '.1f')}")
        self.write()

    def fail(self, name: str, exc: BaseException) -> None:
        self.failed = True
        line = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        self.notes.append(f"failed: {name}: {type(exc).__name__}: {line}")
        if self.args.debug:
            traceback.print_exc()
        log(f"{name} failed: {type(exc).__name__}: {line}")
        self.write()

    def skip(self, name: str, reason: str) -> None:
        self.notes.append(f"skipped: {name}: {reason}")
        log(f"{name} skipped: {reason}")
        self.write()

    def frame_row(self, name: str, role: str, pipe_or_make: Callable[[], StreamDiffVSR], options: Options,
                  extra: dict[str, Any] | None = None) -> StreamDiffVSR | None:
        """Build (or take) a pipeline, measure it over the frames and record it; returns the pipeline."""
        log(f"{name} ...")
        t = time.perf_counter()
        pipe = None
        try:
            with watched() as seen:
                pipe = pipe_or_make()
                build_s = time.perf_counter() - t
                res = measure(pipe, self.frames, self.noises, self.p.warmup)
        except Exception as exc:  # one row's failure (out of memory, a compile error): the others still count
            self.fail(name, exc)
            return None
        res.update(seen)
        if role == "reference":
            self.ref_outs, self.picture = res["outs"], picture_stats(res["outs"])
            self.save_reference(name)
        self.record(name, res | dict(kind="frame", role=role, options=option_changes(options, Options(
            device=options.device)), resolved=resolved(options, self.p.w, self.p.h), build_s=round(build_s, 1),
            frames=self.p.frames, warmup=self.p.warmup) | (extra or {}))
        return pipe

    def run(self) -> None:
        p = self.p
        if p.inductor:
            apply_inductor(p.inductor)
            self.notes.append("torch._inductor.config: " + ", ".join(f"{k}={v}" for k, v in p.inductor.items()))
        if "reference" in p.rows:
            name = "reference" + ("" if not self.args.reference_options else
                                  " (" + ", ".join(self.args.reference_options) + ")")
            self.frame_row(name, "reference", lambda: build(self.load, p.reference, upstream=True), p.reference)
            free()
        elif "ours" in p.rows or "fp8" in p.rows or "frame-graph" in p.rows:
            self.ref_outs = self.saved_reference()
        ours = None
        extra = dict(inductor=p.inductor) if p.inductor else {}
        label = inductor_label(self.args, p.inductor)
        if "ours" in p.rows or "batch" in p.rows or "frame-graph" in p.rows:
            name = row_name(p.ours, label)
            if "ours" in p.rows:
                ours = self.frame_row(name, "ours", lambda: build(self.load, p.ours), p.ours, extra)
            else:
                ours = self._quiet_build(name, p.ours)
        if "batch" in p.rows and ours is not None:
            for b in p.batch:  # the same pipeline: B=1 runs the graphs compiled for the ours row
                self.batch_row(ours, b, label, extra)
        if "frame-graph" in p.rows and ours is not None:
            self.frame_graph_row(ours, label, extra)
        ours = None  # freed before the next rows, whose peak memory must not hold its weights
        free()
        for opts in p.also:
            self.frame_row(row_name(opts, label), "also", lambda o=opts: build(self.load, o), opts, extra)
            free()
        if "fp8" in p.rows:
            self.fp8_row(label, extra)

    def batch_row(self, ours: StreamDiffVSR, b: int, label: str, extra: dict[str, Any]) -> None:
        p = self.p
        name = f"{row_name(p.ours, label)}, B={b} streams"
        log(f"{name} ...")
        try:
            with watched() as seen:
                res = measure_batch(ours, b, p.frames, p.warmup, p.h, p.w, p.check_frames)
        except Exception as exc:  # one row's failure (out of memory at a large B, say): the others still count
            self.fail(name, exc)
        else:
            self.record(name, res | seen | dict(kind="batch", role="batch", resolved=resolved(p.ours, p.w, p.h),
                                                frames=p.frames, warmup=p.warmup) | extra)
        free()

    def _quiet_build(self, name: str, options: Options) -> StreamDiffVSR | None:
        try:
            return build(self.load, options)
        except Exception as exc:
            self.fail(name, exc)
            return None

    def frame_graph_row(self, ours: StreamDiffVSR, label: str, extra: dict[str, Any]) -> None:
        p = self.p
        name = row_name(p.ours, ", ".join(filter(None, [label, "one CUDA graph per warm frame (denoise + decode)"])))
        if p.device.type != "cuda":
            self.skip(name, "CUDA graphs need a CUDA device")
            return
        view = ours.with_options()
        view.denoiser = FrameGraph(view.denoiser)  # type: ignore[assignment]
        self.frame_row(name, "frame-graph", lambda: view, p.ours, extra)

    def fp8_row(self, label: str, extra: dict[str, Any]) -> None:
        p = self.p
        name = row_name(p.ours, ", ".join(filter(None, [label, "fp8 matmuls (U-Net and ControlNet nn.Linear)"])))
        reason = fp8_unsupported(p.device)
        if reason:
            self.skip(name, reason)
            return
        counts: dict[str, int] = {}

        def make() -> StreamDiffVSR:
            pipe = build(self.load, p.ours)
            counts.update(unet=to_fp8(pipe.components.unet), controlnet=to_fp8(pipe.components.controlnet))
            return pipe

        self.frame_row(name, "fp8", make, p.ours, extra | dict(fp8_linear_layers=counts))
        free()

    # -- output
    def data(self, complete: bool = False) -> dict[str, Any]:
        import diffusers

        return dict(schema=SCHEMA, complete=complete, date=_dt.date.today().isoformat(), gpu=self.gpu,
                    device=str(self.p.device), torch=torch.__version__, diffusers=diffusers.__version__,
                    python=sys.version.split()[0], weights=self.weights_desc, lr=[self.p.w, self.p.h],
                    frames=self.p.frames, warmup=self.p.warmup, step=self.args.step, argv=sys.argv[1:],
                    process_s=round(time.perf_counter() - self.t0, 1), picture=self.picture, rows=self.rows,
                    notes=self.notes)

    def write(self, complete: bool = False) -> None:
        if self.args.json:
            write_atomic(self.args.json, dump(self.data(complete)))


@contextlib.contextmanager
def watched() -> Any:
    """What a row's compile did, filled in on exit: the project's fallback warnings (a compile that failed and
    ran eagerly, a precision or tiling fallback), dynamo's graph breaks and graphs made, and inductor's CUDA-graph
    skips (a "compiled with CUDA graphs" row that replays none must say so). Warnings are recorded from every
    thread (the worker thread of CUDA-graph modes too) and shown once on stderr."""
    import warnings

    from torch._dynamo.utils import counters

    from vsstreamdiffvsr import errors

    kinds = tuple(getattr(errors, n) for n in ("CompileFallbackWarning", "PrecisionFallbackWarning",
                                               "TilingFallbackWarning") if hasattr(errors, n))

    def snapshot() -> dict[str, int]:
        return dict(graph_breaks=sum(counters["graph_break"].values()),
                    graphs=int(counters["stats"].get("unique_graphs", 0)),
                    cudagraph_skips=int(counters["inductor"].get("cudagraph_skips", 0)))

    out: dict[str, Any] = {}
    before = snapshot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield out
        finally:
            after = snapshot()
            out["compile_counts"] = {k: after[k] - before[k] for k in after}
            msgs = list(dict.fromkeys(f"{w.category.__name__}: {(str(w.message).splitlines() or [''])[0][:300]}"
                                      for w in caught if issubclass(w.category, kinds)))
            out["warnings"] = msgs
    for m in msgs:
        log(m)


def inductor_label(args: argparse.Namespace, values: dict[str, Any]) -> str:
    """A row's inductor label: the preset's name (its settings are in the notes), else the settings."""
    if not values:
        return ""
    if args.inductor_preset and not args.inductor:
        return f"inductor preset {args.inductor_preset!r}"
    return "inductor " + ", ".join(f"{k}={v}" for k, v in values.items())


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        p = plan(args)
    except (BenchError, ValueError) as exc:
        ap.error(str(exc))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on every dtype cast of a copy would drown the progress lines
    if args.threads is not None or p.device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    # TF32 for float32 on CUDA, as the reference's inference.py runs, is the pipeline's own setting per frame
    try:
        if args.prepare and args.scratch is None:
            raise BenchError("--prepare writes the weights to --scratch: give one")
        run = Run(args, p)
        if args.prepare:
            run.write(complete=True)
            return 0
        run.run()
    except BenchError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 2
    data = run.data(complete=True)
    run.write(complete=True)
    text = render(finite(data))
    print(text, flush=True)
    if args.save is not None:
        path = saved_path(data, tag=args.save or None)
        write_atomic(path.with_suffix(".md"), text + "\n")
        write_atomic(path, dump(data))
        log(f"saved {path} and {path.with_suffix('.md').name}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # every result is written (atomically) by now; skip the interpreter's teardown, where a dry run once died in
    # std::terminate ("terminate called without an active exception", exit -6) after printing all its rows
    os._exit(code)

#!/usr/bin/env python3
"""Speed, memory and picture of Stream-DiffVSR paths, side by side.

    python scripts/bench.py --lr 320x180                      # 720p out, random full-size weights, CUDA
    python scripts/bench.py --lr 480x270 --no-compile         # 1080p out, eager (no compile wait)
    python scripts/bench.py --model-dir DIR --lr 320x180      # real weights
    python scripts/bench.py --tiny --device cpu --frames 3    # CI smoke test (tiny random model)

Paths:
  reference  executes like the reference code: float32 (TF32 matmul/conv on CUDA), eager, RAFT at HR with
             the all-pairs correlation volume, cuDNN autotuning off, flow computed in line, the ControlNet's
             conditioning embedding run at every step. Its RAFT loop is ours, which upsamples only the final
             flow estimate (torchvision upsamples all 12): if anything, the speed-ups are understated
  optimized  --dtype (float16, the CUDA default; "float16,bfloat16" runs one optimized path per precision,
             each built and compiled afresh), channels_last on CUDA (cuDNN autotuning too when not compiled), the next
             frame's flow queued on a side stream as the filter does (--no-prefetch; --graph-flow replays it
             from a CUDA graph), torch.compile with CUDA graphs on CUDA (--no-compile, --compile-mode;
             RAFT compiled with it, --no-compile-flow: eager), --flow, --tile (--tile-denoise), --raft-corr,
             --vae-dtype, --raft-dtype (default auto, as the pipeline: RAFT's networks in float16 from 1080p
             out on CUDA for a float16 path; the row's label says so)
The table gives ms/frame (median over --frames after --warmup frames), peak allocated GPU memory over the
whole run (weights, compile and autotuning included) and over the steady frames, the cold first frame's
time, the warm-up overhead (time of the warm-up frames above the median: compile and autotuning), and PSNR
of each path's output against the float32 output (TF32 on CUDA, as the reference runs) on the same
weights, frames and noise. Speed does not depend on weight values, so random weights are fine for timing;
for the PSNR to mean something they are calibrated to give a picture with a real range (calibrate_random),
and the float32 picture's mean, spread and clamped share are printed under the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsstreamdiffvsr import StreamDiffVSR, StreamState  # noqa: E402
from vsstreamdiffvsr.options import (COMPILE_MODES, DEFAULT_COMPILE_MODE, default_dtype, dtype_name,  # noqa: E402
                                     parse_dtype, parse_raft_dtype, raft_input_size, resolve_compile_flow,
                                     resolve_corr, resolve_raft_dtype)

FULL_UNET = dict(
    in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(True, True, True, False), attention_head_dim=8, cross_attention_dim=1024,
    use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, num_class_embeds=None, norm_num_groups=32,
)
FULL_VAE = dict(encoder_block_out_channels=(64, 64, 64), decoder_block_out_channels=(64, 64, 64),
                num_encoder_blocks=(1, 3, 3), num_decoder_blocks=(3, 3, 1))


def random_full_components(seed: int = 0, init_device: str | torch.device = "cpu") -> dict:
    """Full-size random U-Net / ARTG / VAE / RAFT modules, returned on the CPU (architecture of the release).

    ``init_device="cuda"`` draws the random weights on the GPU (seconds instead of a minute of CPU init).
    """
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torchvision.models.optical_flow import raft_large

    from vsstreamdiffvsr.models.temporal_vae import TemporalTinyVAE

    torch.manual_seed(seed)
    with torch.device(init_device):
        unet = UNet2DConditionModel(**FULL_UNET)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(64, 128, 256))
        for p in (list(controlnet.controlnet_down_blocks.parameters())
                  + list(controlnet.controlnet_mid_block.parameters())):
            torch.nn.init.normal_(p, std=0.01)  # zero-initialised in a fresh ControlNet; make it do work
        parts = dict(unet=unet, controlnet=controlnet, vae=TemporalTinyVAE(**FULL_VAE), raft=raft_large(weights=None))
    parts = {k: torch.nn.Module.to(v, "cpu") for k, v in parts.items()}
    return dict(parts, prompt=torch.randn(1, 77, 1024) * 0.5)


def build(components: dict, device: torch.device, dtype: torch.dtype, **options) -> StreamDiffVSR:
    import copy

    from diffusers import DDIMScheduler

    from vsstreamdiffvsr.models.flow import RaftFlow
    from vsstreamdiffvsr.testing import SCHEDULER_CONFIG

    compile_ = options.pop("compile", False)
    vae_dtype = options.pop("vae_dtype", None) or torch.float32
    compile_mode = options.pop("compile_mode", DEFAULT_COMPILE_MODE)
    compile_flow = resolve_compile_flow(options.pop("compile_flow", None), compile_, device)
    upstream_execution = options.pop("upstream_execution", False)
    to = torch.nn.Module.to  # not diffusers' override, which logs a warning for every dtype cast
    pipe = StreamDiffVSR(unet=to(copy.deepcopy(components["unet"]), dtype).eval(),
                         controlnet=to(copy.deepcopy(components["controlnet"]), dtype).eval(),
                         vae=copy.deepcopy(components["vae"]).to(vae_dtype).eval(),
                         scheduler=DDIMScheduler.from_config(components.get("scheduler", SCHEDULER_CONFIG)),
                         raft=RaftFlow(copy.deepcopy(components["raft"]).eval()),
                         prompt_embeds=components["prompt"], device=device, dtype=dtype, **options)
    if upstream_execution and pipe.cond_embedding is not None:
        # execute like upstream: its ControlNet embeds the (unchanged) condition again at each of the 4 steps
        pipe.controlnet.controlnet_cond_embedding, pipe.cond_embedding = pipe.cond_embedding, None
        pipe._embed = lambda cond: cond
    if compile_:
        pipe.enable_compile(mode=compile_mode)
    if compile_flow:
        pipe.enable_flow_compile()
    return pipe


def make_frames(n: int, h: int, w: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Moving smooth content with grain (CPU), and per-frame noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    frames, noises = [], []
    for i in range(n):
        base = 0.5 + 0.4 * torch.sin((xx + 2.0 * i) / 9.0) * torch.cos((yy - i) / 13.0)
        frame = (base[None, None].repeat(1, 3, 1, 1) + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)
        frames.append(frame)
        noises.append(torch.randn(1, 4, h, w, generator=g))
    return frames, noises


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(pipe: StreamDiffVSR, frames, noises, warmup: int, device: torch.device, prefetch: bool = False) -> dict:
    """Run the frames in order; each frame's time is process_frame (plus queueing the next frame's flow when
    ``prefetch``, as the filter does), from frame on the device to output on the device."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # reserved-memory figures start from this path's weights alone
        torch.cuda.reset_peak_memory_stats(device)
    frames = [f.to(device) for f in frames]
    state, times, outs, ticket, mem, peaks, reserved = StreamState(), [], [], None, [], [], []
    for i, (f, z) in enumerate(zip(frames, noises)):
        sync(device)
        t0 = time.perf_counter()
        nxt: list = []
        queue_next = None
        if prefetch and i + 1 < len(frames):
            ready = pipe.inputs_ready()

            def queue_next(i=i, f=f, ready=ready, after=ticket) -> None:
                # as the filter: RAFT of i+1 while i denoises, reusing frame i's features from its own flow
                nxt.append(pipe.prefetch_flow(frames[i + 1], f, ready=ready, after=after))
        hq, state = pipe.process_frame(f, state, noise=z, flow=ticket, on_enqueued=queue_next)
        sync(device)
        times.append(time.perf_counter() - t0)
        ticket = nxt[0] if nxt else None
        outs.append(hq.float().cpu())
        if device.type == "cuda":  # held between frames: must not grow with the clip's length
            mem.append(round(torch.cuda.memory_allocated(device) / 2**30, 3))
            peaks.append(round(torch.cuda.max_memory_allocated(device) / 2**30, 3))  # this frame's peaks
            reserved.append(torch.cuda.max_memory_reserved(device) / 2**30)  # incl. graph pools
            torch.cuda.reset_peak_memory_stats(device)
    steady = times[warmup:] or times
    median = statistics.median(steady)
    cuda = device.type == "cuda"
    peak = max(peaks) if cuda else float("nan")
    return dict(ms=1000 * median, first_ms=1000 * times[0], peak_gib=peak,
                peak_reserved_gib=max(reserved) if cuda else float("nan"), outs=outs,
                warmup_overhead_s=sum(max(0.0, t - median) for t in times[:warmup]),
                times_ms=[round(1000 * t, 2) for t in times], allocated_between_frames_gib=mem,
                peak_by_frame_gib=peaks,
                fallbacks={k: v for k, v in pipe.stats.items() if k.endswith("fallbacks") and v})


def psnr(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    mse = statistics.fmean(float(((a - b) ** 2).mean()) for a, b in zip(outs, ref))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def max_err(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(outs, ref))


def calibrate_random(components: dict, h: int = 48, w: int = 64) -> dict:
    """Rescale two output layers of *random* weights so that their picture has a trained model's range.

    Random weights decode to a nearly black frame (measured at full size: two thirds of the pixels clamped
    at 0, the rest averaging 0.004), where a PSNR against float32 compares almost nothing and says little
    about precision. On one cold frame (float32, CPU, ``h``x``w`` LR) this scales the U-Net's ``conv_out``
    so its prediction has unit spread, then sets the decoder's last conv per RGB channel so the picture has
    mean 0.5 and spread 0.2. The speed is unchanged: same shapes, same kernels. Modifies ``components``.
    """
    frames, noises = make_frames(1, h, w, seed=1)
    cpu = torch.device("cpu")

    def observe(layer: str) -> torch.Tensor:
        pipe = build(components, cpu, torch.float32, channels_last=False, oom_fallback=False)
        seen: list[torch.Tensor] = []
        module = pipe.unet.conv_out if layer == "unet" else pipe.vae.decoder.layers[-1]
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


def _load_folder(root: Path) -> dict:
    from vsstreamdiffvsr import weights

    root = weights.validate_model_dir(root, need_raft=False)  # as from_pretrained: RAFT is checked by loading it
    raft = weights.load_raft(root).raft
    return dict(unet=weights.load_unet(root), controlnet=weights.load_controlnet(root), vae=weights.load_vae(root),
                raft=raft, prompt=weights.empty_prompt_embedding(root),
                scheduler=dict(weights.load_scheduler(root).config))


def load_components(device: torch.device, model_dir: Path | None = None, tiny: bool = False) -> tuple[dict, str]:
    """Weights for the paths: a real checkpoint folder, or random (tiny or full-size) weights calibrated by
    :func:`calibrate_random` so the PSNR figures are taken on a picture with a real range."""
    if model_dir is not None:
        return _load_folder(Path(model_dir)), str(model_dir)
    if tiny:
        from vsstreamdiffvsr.testing import make_tiny_checkpoint

        with tempfile.TemporaryDirectory() as tmp:  # read into memory, then gone: runs leave nothing behind
            load = _load_folder(make_tiny_checkpoint(tmp, seed=0))
        return calibrate_random(load), "tiny random (calibrated)"
    load = random_full_components(init_device=device if device.type == "cuda" else "cpu")
    return calibrate_random(load), "random full-size (calibrated)"


def picture_stats(outs: list[torch.Tensor]) -> dict:
    """Mean, spread and clamped share of a path's output: a PSNR is only telling on a picture with range."""
    o = torch.stack(outs)
    return dict(mean=round(float(o.mean()), 4), std=round(float(o.std()), 4),
                clamped=round(float(((o <= 0) | (o >= 1)).float().mean()), 4))


REFERENCE_OPTIONS = dict(channels_last=False, raft_corr="full", oom_fallback=False, cudnn_benchmark=False,
                         graph_flow=False, upstream_execution=True, raft_dtype="float32")


def run_path(load: dict, device: torch.device, dtype: torch.dtype, options: dict, frames, noises, warmup: int,
             prefetch: bool = False) -> dict:
    """Build one path from ``load``, measure it, free it; the result keeps its outputs (CPU) under "outs"."""
    pipe = build(load, device, dtype, **options)
    try:
        return measure(pipe, frames, noises, warmup, device, prefetch=prefetch)
    finally:
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def setup_device(device: torch.device) -> str:
    """Reference numerics switches (TF32, as the reference's inference.py runs) and the device's name."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.cuda.get_device_name(device)
    return "CPU"


def _db(value: float | None) -> str:
    """dB to one place; "-" where there is none (nan here, null once a result went through JSON's
    ``_finite``, as the second-process step's results do)."""
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _gib(value: float | None) -> str:
    """GiB to two places; "-" where none was measured (nan, or null after JSON as for ``_db``)."""
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def table(results: dict, title: str) -> str:
    """Markdown table of paths. The PSNR column compares with the float32 path (TF32 on CUDA, as the
    reference runs): "-" where there is none or it is the row itself; fallbacks are listed under the table."""
    lines = [title, "| path | ms/frame (median) | cold frame ms | warm-up overhead s (compile, autotune) | "
                    "peak GiB (whole run) | peak GiB (steady frames) | PSNR vs fp32 (dB) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    base_ms = next(iter(results.values()))["ms"]
    notes = []
    for name, r in results.items():
        steady = [p for p in r.get("peak_by_frame_gib", [])[r.get("warmup", 0):] if p is not None]
        psnr_db = r["psnr_vs_fp32"]
        psnr_db = None if psnr_db is not None and math.isinf(psnr_db) else psnr_db  # inf: the row itself
        lines.append(f"| {name} | {r['ms']:.1f} | {r['first_ms']:.0f} | {r['warmup_overhead_s']:.1f} | "
                     f"{_gib(r['peak_gib'])} | {_gib(max(steady)) if steady else '-'} | "
                     f"{_db(psnr_db)} | {base_ms / r['ms']:.2f}x |")
        if r.get("fallbacks"):
            notes.append(f"- {name}: fallbacks {r['fallbacks']}")
    return "\n".join(lines + notes)


def _finite(value):
    """JSON without NaN/Infinity (strict parsers reject them): null instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def parse_lr(text: str) -> tuple[int, int]:
    """"WxH" -> (w, h), padded to multiples of 4 as the filter pads (480x270 runs as 480x272)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--lr must be WIDTHxHEIGHT, e.g. 320x180, got {text!r}") from None
    return w + -w % 4, h + -h % 4


def parse_dtypes(text: str) -> list[torch.dtype]:
    """``--dtype``: one precision or a comma-separated list of them, one optimized path each."""
    dtypes = [parse_dtype(part.strip()) for part in text.split(",")]
    if len(set(dtypes)) != len(dtypes):
        raise ValueError(f"--dtype lists a precision twice: {text!r}")
    return dtypes


def raft_label(args: argparse.Namespace, device: torch.device, w: int, h: int) -> str:
    """"RAFT compiled" where the optimized path compiles it (the lean correlation always runs eagerly)."""
    if not resolve_compile_flow(args.compile_flow, args.compile, device):
        return ""
    corr = resolve_corr(args.raft_corr, *raft_input_size(h, w, args.flow))
    return "RAFT compiled" if corr != "lean" else "RAFT eager (lean correlation)"


def half_raft_label(raft_dtype: str | torch.dtype | None, flow: str, dtype: torch.dtype, device: torch.device,
                    w: int, h: int) -> str:
    """"RAFT float16" where a path at ``dtype`` runs RAFT's networks in half precision for LR frames of w x h:
    by ``raft_dtype`` (the option's value), or by the pipeline's choice where that is None (auto; "(auto)" in
    the label); "" for float32 RAFT."""
    given = parse_raft_dtype(raft_dtype)
    raft = resolve_raft_dtype(given, dtype, device, *raft_input_size(h, w, flow))
    return "" if raft == torch.float32 else f"RAFT {dtype_name(raft)}" + (" (auto)" if given is None else "")


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Every option checked before weights load (minutes on a GPU): ValueError naming the option. (w, h)."""
    from vsstreamdiffvsr.options import parse_component_dtype, parse_device
    from vsstreamdiffvsr.pipeline import MIN_LR_SIDE
    from vsstreamdiffvsr.tiling import parse_tile

    w, h = parse_lr(args.lr)
    device = parse_device(args.device)
    if args.model_dir is not None and args.tiny:
        raise ValueError("--tiny and --model-dir exclude each other")
    if args.warmup < 0 or args.frames - args.warmup < 1:
        raise ValueError(f"--frames ({args.frames}) must be larger than --warmup ({args.warmup}, >= 0): the median "
                         "is over the frames after the warm-up (20 or more for a figure to report)")
    parse_dtypes(args.dtype)
    parse_component_dtype("vae_dtype", args.vae_dtype)
    parse_raft_dtype(args.raft_dtype)
    tile = parse_tile(args.tile)
    if args.tile_denoise and tile is None:
        raise ValueError("--tile-denoise needs --tile")
    if min(w, h) < MIN_LR_SIDE or (args.flow == "lr" and min(w, h) < 4 * MIN_LR_SIDE):
        need = 4 * MIN_LR_SIDE if args.flow == "lr" else MIN_LR_SIDE
        raise ValueError(f"--lr {w}x{h}: the model needs LR sides of at least {need} px"
                         f"{' with --flow lr' if args.flow == 'lr' else ''}")
    if args.graph_flow and device.type != "cuda":
        raise ValueError("--graph-flow needs a CUDA device")
    return w, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="real checkpoint folder (default: random full-size weights)")
    ap.add_argument("--tiny", action="store_true", help="tiny random checkpoint (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lr", default="320x180", help="LR input WxH (output is 4x)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--dtype", default=dtype_name(default_dtype(torch.device("cuda"))),
                    help="optimized path precision, or a comma-separated list of them, one path each "
                         "(float16, bfloat16, float32; default: %(default)s, the pipeline's CUDA default)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the optimized path (default: on for CUDA, off elsewhere)")
    ap.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE, choices=COMPILE_MODES,
                    help="torch.compile mode (default: %(default)s)")
    ap.add_argument("--flow", default="hr", choices=("hr", "lr"))
    ap.add_argument("--tile", type=int, default=None, help="LR tile size for the optimized path")
    ap.add_argument("--tile-denoise", action="store_true", help="with --tile: denoise in tiles too")
    ap.add_argument("--vae-dtype", default=None, help="tiny VAE precision of the optimized path (default float32)")
    ap.add_argument("--raft-dtype", default=None,
                    help="precision of RAFT's networks in the optimized path (default auto, as the pipeline: float16 "
                         "from 1080p out on CUDA with --dtype float16, else float32, the reference)")
    ap.add_argument("--raft-corr", default="auto", choices=("auto", "full", "half", "lean"),
                    help="RAFT correlation of the optimized path (half: float16 pyramid; lean: none)")
    ap.add_argument("--no-prefetch", action="store_true", help="optimized path: compute each flow in line")
    ap.add_argument("--compile-flow", action=argparse.BooleanOptionalAction, default=None,
                    help="optimized path: torch.compile RAFT too (default: with --compile on CUDA, as the pipeline)")
    ap.add_argument("--graph-flow", action=argparse.BooleanOptionalAction, default=None,
                    help="replay the prefetched flow from a CUDA graph (default: off)")
    ap.add_argument("--skip-reference", action="store_true", help="only the optimized path (no PSNR)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    try:
        w, h = check_args(args)
    except ValueError as exc:
        ap.error(str(exc))

    device = torch.device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    gpu = setup_device(device)
    load, weights_desc = load_components(device, args.model_dir, args.tiny)
    frames, noises = make_frames(args.frames, h, w)

    paths = [] if args.skip_reference else [("reference", torch.float32, REFERENCE_OPTIONS, False)]
    opt = dict(channels_last=None, flow=args.flow, tile=args.tile, tile_denoise=args.tile_denoise,
               compile=args.compile, compile_mode=args.compile_mode, raft_corr=args.raft_corr,
               graph_flow=args.graph_flow, compile_flow=args.compile_flow,
               vae_dtype=parse_dtype(args.vae_dtype) if args.vae_dtype else None, raft_dtype=args.raft_dtype)
    label = [f"compiled ({args.compile_mode})" if args.compile else "",
             "flow=lr" if args.flow == "lr" else "", f"tile={args.tile}" if args.tile else "",
             "tile_denoise" if args.tile_denoise else "", f"vae {args.vae_dtype}" if args.vae_dtype else "",
             f"raft_corr={args.raft_corr}" if args.raft_corr != "auto" else "",
             "flow in line" if args.no_prefetch else "", "flow graph" if args.graph_flow else "",
             raft_label(args, device, w, h)]
    for opt_dtype in parse_dtypes(args.dtype):
        parts = [dtype_name(opt_dtype), *label, half_raft_label(args.raft_dtype, args.flow, opt_dtype, device, w, h)]
        name = ", ".join(p for p in parts if p)
        paths.append((f"optimized ({name})", opt_dtype, opt, not args.no_prefetch))
    results, ref_outs = {}, None
    for name, dtype, options, prefetch in paths:
        res = run_path(load, device, dtype, options, frames, noises, args.warmup, prefetch=prefetch)
        if ref_outs is None and dtype == torch.float32:
            ref_outs = res["outs"]
            res["picture"] = picture_stats(ref_outs)
        res["psnr_vs_fp32"] = psnr(res["outs"], ref_outs) if ref_outs is not None else float("nan")
        del res["outs"]
        res["warmup"] = args.warmup
        results[name] = res

    print(table(results, f"# {gpu}, {w}x{h} -> {4 * w}x{4 * h}, {weights_desc} weights, {args.frames} frames "
                         f"(median after {args.warmup}), torch {torch.__version__}"))
    if ref_outs is not None:
        pic = picture_stats(ref_outs)
        print(f"float32 picture: mean {pic['mean']:.3f}, spread {pic['std']:.3f}, "
              f"{100 * pic['clamped']:.1f}% of values clamped to 0 or 1")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps(_finite(dict(gpu=gpu, lr=[w, h], weights=weights_desc, torch=torch.__version__,
                                                     settings=settings, results=results)),
                                        indent=2, default=str, allow_nan=False))


if __name__ == "__main__":
    main()

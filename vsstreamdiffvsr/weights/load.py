"""Loading the components from a model folder, each checked first; the first problem raises ModelFilesError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.flow import RAFT_FILENAME
from .configs import _read_config
from .folder import find_raft_weights
from .problems import _fail, _short
from .shapes import _COMPONENTS, _check_component


def _load_component(model_dir: Path, name: str, dtype: torch.dtype) -> nn.Module:
    from safetensors.torch import load_file

    model = _check_component(model_dir, name)
    try:
        state = load_file(str(model_dir / name / _COMPONENTS[name][0]), device="cpu")
    except Exception as exc:
        raise _fail(model_dir, f"{name}/{_COMPONENTS[name][0]} cannot be read ({_short(exc)})") from None
    # Cast before assigning (diffusers' own ``.to(dtype)`` logs a warning for every model).
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:  # the header said otherwise: a file changed since, or a lying header
        raise _fail(model_dir, f"{name}/{_COMPONENTS[name][0]} does not load ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]})") from None
    leftovers = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:  # a buffer that is not in the checkpoint: materialise it the slow, ordinary way
        raise RuntimeError(f"internal error: {name} has tensors outside the checkpoint: {leftovers[:3]}")
    return model.eval().requires_grad_(False)


def load_unet(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """diffusers ``UNet2DConditionModel`` from ``unet/``."""
    return _load_component(model_dir, "unet", dtype)


def load_controlnet(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """diffusers ``ControlNetModel`` (ARTG) from ``controlnet/``."""
    return _load_component(model_dir, "controlnet", dtype)


def load_vae(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our :class:`~vsstreamdiffvsr.models.temporal_vae.TemporalTinyVAE` from ``vae/``."""
    return _load_component(model_dir, "vae", dtype)


def load_scheduler(model_dir: Path) -> Any:
    """diffusers ``DDIMScheduler`` from ``scheduler/scheduler_config.json`` (its values checked first)."""
    from diffusers import DDIMScheduler

    config = _read_config(model_dir, "scheduler/scheduler_config.json")
    try:
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(4)  # the config's values are only used (and checked) here
    except Exception as exc:
        raise _fail(model_dir, f"scheduler/scheduler_config.json is not a usable DDIM config ({_short(exc)})") from None
    return scheduler


def _raft_state(model_dir: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An unloaded RAFT-large and its checked checkpoint state."""
    from ..models.flow import build_raft

    path = find_raft_weights(model_dir)
    if path is None:
        raise _fail(model_dir, f"raft/{RAFT_FILENAME} is missing (also not in torch hub's checkpoint folder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _fail(model_dir, f"{path} is corrupt ({type(exc).__name__}); delete it and download again") from None
    raft = build_raft()
    if not isinstance(state, dict):
        raise _fail(model_dir, f"{path} holds no state dict")
    expected = raft.state_dict()
    bad = [k for k in expected if not isinstance(state.get(k), torch.Tensor) or tuple(state[k].shape) != tuple(
        expected[k].shape) or state[k].is_floating_point() != expected[k].is_floating_point()]
    if bad or set(state) - set(expected):
        example = (bad or sorted(set(state) - set(expected)))[0]
        raise _fail(model_dir, f"{path} is not a RAFT-large checkpoint (e.g. {example})")
    return raft, state


def load_raft(model_dir: Path) -> nn.Module:
    """torchvision RAFT-large with the ``C_T_SKHT_V2`` weights, wrapped as :class:`RaftFlow`."""
    from ..models.flow import RaftFlow

    raft, state = _raft_state(model_dir)
    raft.load_state_dict(state)
    return RaftFlow(raft.eval().requires_grad_(False))

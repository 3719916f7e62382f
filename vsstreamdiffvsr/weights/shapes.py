"""Each component's config and weights file checked against each other, before anything heavy is loaded.

The model is built from its (range-checked) config on the meta device, costing no memory, and the weights
file's safetensors header is compared with it: tensor names, shapes, floating-point dtypes. Each problem is
reported as one entry naming its file; the ``_check_*`` helpers raise one :class:`ModelFilesError` listing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configs import _read_config
from .files import _header
from .layout import DIFFUSERS_WEIGHTS, TEXT_ENCODER_WEIGHTS
from .problems import _fail, _fail_all, _Found, _short


def _meta_build(model_dir: Path, rel_config: str, build: Callable[[dict[str, Any]], nn.Module],
                config: dict[str, Any]) -> nn.Module:
    try:
        with torch.device("meta"):
            return build(config)
    except Exception as exc:  # a config that the model class rejects
        raise _fail(model_dir, f"{rel_config} describes no valid model ({_short(exc)})") from None


#: safetensors dtypes a floating-point parameter may be stored in (it is cast on loading)
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def _compare(model_dir: Path, rel_weights: str, rel_config: str, model: nn.Module,
             header: dict[str, tuple[str, tuple[int, ...]]], ignore: Callable[[str], bool] = lambda k: False) -> None:
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(k for k in expected if k not in header)
    unexpected = sorted(k for k in header if k not in expected and not ignore(k))
    wrong = sorted(k for k in expected if k in header and header[k][1] != expected[k])
    not_float = sorted(k for k, v in state.items() if k in header and v.is_floating_point()
                       and header[k][0] not in FLOAT_DTYPES)
    if not_float:
        k = not_float[0]
        raise _fail(model_dir, f"{rel_weights} stores {len(not_float)} floating-point tensors as other types "
                               f"(e.g. {k}: {header[k][0]}); the file is corrupt or not this model's")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {list(header[k][1])}, "
                         f"config {list(expected[k])})")
        raise _fail(model_dir, f"{rel_weights} does not match {rel_config}: " + "; ".join(parts))


def _unet_builder(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def _controlnet_builder(config: dict[str, Any]) -> nn.Module:
    from diffusers import ControlNetModel

    return ControlNetModel.from_config(config)


def _vae_builder(config: dict[str, Any]) -> nn.Module:
    from ..models.temporal_vae import TemporalTinyVAE

    return TemporalTinyVAE.from_config(config)


def _text_encoder_builder(config: dict[str, Any]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig.from_dict(config))


_COMPONENTS: dict[str, tuple[str, Callable[[dict[str, Any]], nn.Module]]] = {
    "unet": (DIFFUSERS_WEIGHTS, _unet_builder),
    "controlnet": (DIFFUSERS_WEIGHTS, _controlnet_builder),
    "vae": (DIFFUSERS_WEIGHTS, _vae_builder),
}


def _pair_problems(model_dir: Path, rel_config: str, rel_weights: str, builder: Callable[[dict[str, Any]], nn.Module],
                   remap: Callable[[nn.Module], Callable[[str], str]] | None = None,
                   ignore: Callable[[str], bool] = lambda k: False) -> tuple[nn.Module | None, list[str]]:
    """A config and its weights file, each checked on its own, then against each other: the model built on
    the meta device (None if the config is unusable) and every problem found."""
    found = _Found()
    config = found.attempt(_read_config, model_dir, rel_config)
    header = found.attempt(_header, model_dir, rel_weights)
    model = None if config is None else found.attempt(_meta_build, model_dir, rel_config, builder, config)
    if model is not None and header is not None:
        if remap is not None:
            to_model = remap(model)
            header = {to_model(k): v for k, v in header.items()}
        found.attempt(_compare, model_dir, rel_weights, rel_config, model, header, ignore)
    return model, found.problems


def _component_problems(model_dir: Path, name: str) -> tuple[nn.Module | None, list[str]]:
    weights, builder = _COMPONENTS[name]
    return _pair_problems(model_dir, f"{name}/config.json", f"{name}/{weights}", builder)


def _check_component(model_dir: Path, name: str) -> nn.Module:
    """The component built on the meta device; ModelFilesError listing the problems of its two files."""
    model, problems = _component_problems(model_dir, name)
    if problems or model is None:
        raise _fail_all(model_dir, problems)
    return model


def _text_key_mapper(model: nn.Module) -> Callable[[str], str]:
    """File key -> model key: the checkpoint has ``text_model.`` prefixes, transformers >= 5 models do not."""
    prefixed = any(k.startswith("text_model.") for k in model.state_dict())
    if prefixed:
        return lambda k: k if k.startswith("text_model.") else "text_model." + k
    return lambda k: k.removeprefix("text_model.")


def _text_encoder_problems(model_dir: Path) -> tuple[nn.Module | None, list[str]]:
    return _pair_problems(model_dir, "text_encoder/config.json", f"text_encoder/{TEXT_ENCODER_WEIGHTS}",
                          _text_encoder_builder, remap=_text_key_mapper, ignore=lambda k: k.endswith("position_ids"))


def _check_text_encoder(model_dir: Path) -> nn.Module:
    model, problems = _text_encoder_problems(model_dir)
    if problems or model is None:
        raise _fail_all(model_dir, problems)
    return model

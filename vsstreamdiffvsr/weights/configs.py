"""Config files read and checked against sane ranges before any model class sees them.

Every size-setting config value is checked first: a crafted config (say 3000 layers per block) would otherwise
cost minutes and gigabytes before any error. The ranges admit the release (Stream-DiffVSR: 4 U-Net levels of up
to 1024 channels, 2 layers per block, 23 text layers of 1024) and the tiny test checkpoints with a wide margin;
the worst case they admit builds on the meta device in seconds. A value outside its range is reported as one
problem naming the file, the key, the value and the allowed range.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from .files import _read_json
from .problems import _fail_all

#: the most resolution levels a U-Net, ControlNet or VAE may have (the release has 4 and 3)
MAX_LEVELS = 6


class _Range(NamedTuple):
    """What one config key may hold. ``kind``: "int"; "float" (finite); "ints" (an int, or one per level, or
    one list per level); "list" (one int per level); "names" (one string per level); "flags" (a bool or one
    per level); "floats" (a list of up to ``max_len`` floats)."""

    lo: float
    hi: float
    kind: str = "int"
    nullable: bool = False
    max_len: int = MAX_LEVELS


_NET_RANGES: dict[str, _Range] = {  # shared by the U-Net and the ControlNet (diffusers' names)
    "in_channels": _Range(1, 64),
    "block_out_channels": _Range(1, 4096, "list"),
    "down_block_types": _Range(0, 0, "names"),
    "only_cross_attention": _Range(0, 0, "flags"),
    "layers_per_block": _Range(1, 8, "ints"),
    "transformer_layers_per_block": _Range(1, 10, "ints"),
    "attention_head_dim": _Range(1, 512, "ints", nullable=True),
    "num_attention_heads": _Range(1, 512, "ints", nullable=True),
    "cross_attention_dim": _Range(1, 8192, "ints"),
    "encoder_hid_dim": _Range(1, 8192, nullable=True),
    "norm_num_groups": _Range(1, 1024, nullable=True),
    "time_embedding_dim": _Range(1, 16384, nullable=True),
    "num_class_embeds": _Range(1, 100_000, nullable=True),
    "projection_class_embeddings_input_dim": _Range(1, 65536, nullable=True),
    "addition_time_embed_dim": _Range(1, 8192, nullable=True),
    "addition_embed_type_num_heads": _Range(1, 512),
    "time_cond_proj_dim": _Range(1, 8192, nullable=True),
    "conv_in_kernel": _Range(1, 7),
    "downsample_padding": _Range(0, 8),
}

#: file -> key -> allowed values; keys not listed do not size anything (names, flags, rates)
CONFIG_RANGES: dict[str, dict[str, _Range]] = {
    "unet/config.json": {
        **_NET_RANGES,
        "out_channels": _Range(1, 64),
        "up_block_types": _Range(0, 0, "names"),
        "reverse_transformer_layers_per_block": _Range(1, 10, "ints", nullable=True),
        "conv_out_kernel": _Range(1, 7),
    },
    "controlnet/config.json": {
        **_NET_RANGES,
        "conditioning_channels": _Range(1, 16),
        "conditioning_embedding_out_channels": _Range(1, 4096, "list"),
    },
    "vae/config.json": {
        "in_channels": _Range(1, 16),
        "out_channels": _Range(1, 16),
        "latent_channels": _Range(1, 64),
        "block_out_channels": _Range(1, 1024, "list"),
        "encoder_block_out_channels": _Range(1, 1024, "list"),
        "decoder_block_out_channels": _Range(1, 1024, "list"),
        "num_encoder_blocks": _Range(0, 16, "list"),
        "num_decoder_blocks": _Range(0, 16, "list"),
        "upsampling_scaling_factor": _Range(1, 8),
        "scaling_factor": _Range(1e-6, 1e6, "float"),
    },
    "text_encoder/config.json": {
        "vocab_size": _Range(1, 1_000_000),
        "hidden_size": _Range(1, 8192),
        "intermediate_size": _Range(1, 32768),
        "num_hidden_layers": _Range(1, 64),
        "num_attention_heads": _Range(1, 256),
        "max_position_embeddings": _Range(1, 8192),
        "projection_dim": _Range(1, 8192),
        "layer_norm_eps": _Range(0, 1, "float"),
    },
    "scheduler/scheduler_config.json": {
        "num_train_timesteps": _Range(1, 10_000),
        "beta_start": _Range(0, 1, "float"),
        "beta_end": _Range(0, 1, "float"),
        "steps_offset": _Range(0, 10_000),
        "trained_betas": _Range(0, 1, "floats", nullable=True, max_len=10_000),
    },
}


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(r: _Range) -> str:
    num = lambda x: str(int(x)) if float(x).is_integer() else repr(x)  # noqa: E731
    return f"{num(r.lo)}..{num(r.hi)}"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _value_problem(key: str, value: object, r: _Range) -> str | None:
    """What is wrong with ``value`` for ``key`` (None if nothing)."""
    if value is None and r.nullable:
        return None
    shown, span = _show(value), _bounds(r)
    seq = isinstance(value, (list, tuple))
    if seq and r.kind in ("ints", "list", "names", "flags", "floats") and not 1 <= len(value) <= r.max_len:
        return f"{key} = {shown} has {len(value)} entries; allowed 1..{r.max_len} entries"
    if r.kind == "int":
        if not _is_int(value):
            return f"{key} = {shown} is not an integer in {span}"
        items: list[object] = [value]
    elif r.kind == "float":
        if not _is_number(value):
            return f"{key} = {shown} is not a finite number in {span}"
        items = [value]
    elif r.kind == "names":
        ok = seq and all(isinstance(v, str) and len(v) <= 200 for v in value)
        return None if ok else f"{key} = {shown} is not a list of 1..{r.max_len} block names"
    elif r.kind == "flags":
        ok = isinstance(value, bool) or (seq and all(isinstance(v, bool) for v in value))
        return None if ok else f"{key} = {shown} is not true/false or a list of 1..{r.max_len} of them"
    elif r.kind == "floats":
        if not seq or not all(_is_number(v) for v in value):
            return f"{key} = {shown} is not a list of finite numbers in {span}"
        items = list(value)
    elif r.kind == "list":
        if not seq or not all(_is_int(v) for v in value):
            return f"{key} = {shown} is not a list of 1..{r.max_len} integers in {span}"
        items = list(value)
    else:  # "ints": an int, one per level, or (transformer layers) one list per level
        if _is_int(value):
            items = [value]
        elif seq:
            items = []
            for v in value:
                if isinstance(v, (list, tuple)) and 1 <= len(v) <= 32 and all(_is_int(x) for x in v):
                    items.extend(v)
                elif _is_int(v):
                    items.append(v)
                else:
                    return f"{key} = {shown} is not an integer in {span} or a list of them (one per level)"
        else:
            return f"{key} = {shown} is not an integer in {span} or a list of them (one per level)"
    bad = [v for v in items if not r.lo <= v <= r.hi]  # type: ignore[operator]
    if bad:
        return f"{key} = {shown}: {_show(bad[0])} is outside the allowed range {span}"
    return None


def _range_problems(rel: str, config: dict[str, Any]) -> list[str]:
    """Every value of ``config`` (the parsed file ``rel``) outside :data:`CONFIG_RANGES`, each naming the file,
    the key, the value and the allowed range."""
    problems = []
    for key, r in CONFIG_RANGES.get(rel, {}).items():
        if key in config:
            problem = _value_problem(key, config[key], r)
            if problem:
                problems.append(f"{rel}: {problem}")
    return problems


def _read_config(model_dir: Path, rel: str) -> dict[str, Any]:
    """A config file, checked against :data:`CONFIG_RANGES` before any model class sees it."""
    config = _read_json(model_dir, rel)
    problems = _range_problems(rel, config)
    if problems:
        raise _fail_all(model_dir, problems)
    return config

"""The model folder: where it is, whether it is complete, how to load each component, how to download it.

A model folder has exactly the Hugging Face layout of ``Jamichsu/Stream-DiffVSR``::

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    controlnet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    scheduler/scheduler_config.json
    text_encoder/{config.json, model.safetensors}     (only until the prompt embedding is cached)
    tokenizer/...                                      (optional, unused: the prompt ids are fixed)
    raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth            (or torch hub's checkpoint folder)

Every file is checked before anything heavy is loaded: configs against sane ranges before any model class
sees them, weights headers against the configs. :func:`validate_model_dir` reports every problem of the folder
in one :class:`ModelFilesError` (one entry per file or check); the loaders stop at the first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .models.flow import RAFT_FILENAME, RAFT_URL

#: torchvision's RAFT file name carries the first 8 hex digits of its SHA-256
RAFT_SHA256_PREFIX = RAFT_FILENAME.rsplit("-", 1)[1].split(".")[0]

__all__ = [
    "HF_REPO_ID", "ENV_MODEL_DIR", "EMPTY_PROMPT_IDS", "ModelFilesError", "default_model_dir", "user_cache_dir",
    "resolve_model_dir", "find_raft_weights", "validate_model_dir", "read_safetensors_header",
    "load_unet", "load_controlnet", "load_vae", "load_scheduler", "load_raft", "empty_prompt_embedding",
    "download",
]

HF_REPO_ID = "Jamichsu/Stream-DiffVSR"
ENV_MODEL_DIR = "VSSTREAMDIFFVSR_MODEL_DIR"
#: The SD2 tokenizer's ids for the empty prompt "", padded to 77 with "!" (id 0).
EMPTY_PROMPT_IDS: tuple[int, ...] = (49406, 49407) + (0,) * 75
PROMPT_CACHE_NAME = "empty_prompt_embedding.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "model.safetensors"


#: a config file larger than this is not a config (the release's largest is about 2 kB)
MAX_CONFIG_BYTES = 1 << 20


class ModelFilesError(RuntimeError):
    """A model file is missing, truncated, corrupt or does not match its config.

    ``str(exc)`` is one line naming every problem and the fix. ``problems`` holds the problems one by one
    (each names its file); ``summary`` is one line without the list (the command line prints it first and
    the problems below it).
    """

    def __init__(self, message: str, problems: Sequence[str] = (), summary: str | None = None) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
        self.summary: str = summary or message


def _fix_hint(model_dir: Path) -> str:
    return (f"fix: run `python -m vsstreamdiffvsr download --dir {model_dir}` (or point model_dir / ${ENV_MODEL_DIR} "
            "at a complete copy)")


def _fail(model_dir: Path, what: str) -> ModelFilesError:
    message = f"model folder {model_dir}: {what}; {_fix_hint(model_dir)}"
    return ModelFilesError(message, (what,), message)


def _fail_all(model_dir: Path, problems: Sequence[str]) -> ModelFilesError:
    """One error for every problem found (the same as :func:`_fail` for a single one)."""
    if len(problems) == 1:
        return _fail(model_dir, problems[0])
    listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return ModelFilesError(f"model folder {model_dir} has {len(problems)} problems: {listed}; {_fix_hint(model_dir)}",
                           problems, f"model folder {model_dir} has {len(problems)} problems; {_fix_hint(model_dir)}")


class _Found:
    """Collects the problems of several independent checks."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def attempt(self, check: Callable[..., Any], *args: Any) -> Any:
        """``check(*args)``, or None after recording the problems of its ModelFilesError."""
        try:
            return check(*args)
        except ModelFilesError as exc:
            self.problems.extend(exc.problems)
            return None


def user_cache_dir() -> Path:
    """The per-user cache folder of this package (XDG on Linux, Caches on macOS, LOCALAPPDATA on Windows)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the spec: ignore a relative one
    return base / "vsstreamdiffvsr"


def default_model_dir() -> Path:
    """``$VSSTREAMDIFFVSR_MODEL_DIR`` if set, else ``<user cache>/vsstreamdiffvsr/models``."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env).expanduser()
    return user_cache_dir() / "models"


def _as_path(model_dir: object) -> Path:
    """``model_dir`` as a Path; TypeError / ValueError naming the argument when it is not a usable path."""
    if isinstance(model_dir, (str, os.PathLike)) and not isinstance(model_dir, bool):
        text = os.fspath(model_dir)
        if isinstance(text, str):
            if not text:
                raise ValueError("model_dir is an empty string; give a folder, or None for the default folder")
            if "\0" in text:
                raise ValueError(f"model_dir {text!r} contains a NUL character")
            return Path(text)
    raise TypeError(f"model_dir must be a path (str or os.PathLike), got {type(model_dir).__name__}")


def resolve_model_dir(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """The absolute folder to use: the argument (``~`` expanded), else :func:`default_model_dir`.

    Raises TypeError (or ValueError) when ``model_dir`` is not a path, ModelFilesError when the path cannot
    be resolved (a symbolic link loop, an unknown home folder...). The folder need not exist.
    """
    origin = ""
    try:
        if model_dir is None:
            origin = f" (from ${ENV_MODEL_DIR})" if os.environ.get(ENV_MODEL_DIR) else ""
            path = default_model_dir()
        else:
            path = _as_path(model_dir)
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # 3.12 raises RuntimeError for a loop, 3.13 OSError(ELOOP)
        given = model_dir if model_dir is not None else os.environ.get(ENV_MODEL_DIR)
        shown = os.path.abspath(os.fspath(given)) if isinstance(given, (str, os.PathLike)) else "the default folder"
        loop = "loop" in str(exc).lower() or getattr(exc, "errno", None) == errno.ELOOP
        why = ("a symbolic link in it leads back to itself (symbolic link loop)" if loop
               else _short(exc).split(": ", 1)[-1])
        raise ModelFilesError(f"model folder {shown}{origin} cannot be used: {why}; fix: give a folder path that "
                              "exists or can be created") from None


def find_raft_weights(model_dir: Path) -> Path | None:
    """``<model_dir>/raft/<file>``, else torch hub's checkpoint folder, else None."""
    for candidate in (model_dir / "raft" / RAFT_FILENAME, Path(torch.hub.get_dir()) / "checkpoints" / RAFT_FILENAME):
        if candidate.is_file():
            return candidate
    return None


# -------------------------------------------------------------------------------------------- config ranges
# Every size-setting config value is checked before a model class sees it: a crafted config (say 3000 layers
# per block) would otherwise cost minutes and gigabytes before any error. The ranges admit the release
# (Stream-DiffVSR: 4 U-Net levels of up to 1024 channels, 2 layers per block, 23 text layers of 1024) and the
# tiny test checkpoints with a wide margin; the worst case they admit builds on the meta device in seconds.

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


# ----------------------------------------------------------------------------------------- file checks

def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header; ValueError if the file is not whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("file is too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 512 * 1024 * 1024:
            raise ValueError("header length is larger than the file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("header is not valid JSON (corrupt or not safetensors)") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"header entry {name!r} is malformed") from None
    if 8 + n + end > size:
        raise ValueError(f"file is truncated ({size} bytes, header promises {8 + n + end})")
    if 8 + n + end < size:
        raise ValueError(f"file has {size - 8 - n - end} trailing bytes (corrupt)")
    return out


def _regular_file(model_dir: Path, rel: str) -> os.stat_result:
    """The stat of ``model_dir / rel`` (links followed); ModelFilesError if it is missing or not a file."""
    try:
        st = os.stat(model_dir / rel)
    except (FileNotFoundError, NotADirectoryError):
        raise _fail(model_dir, f"{rel} is missing") from None
    except OSError as exc:
        raise _fail(model_dir, f"{rel} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(model_dir, f"{rel} is not a regular file")
    return st


def _read_json(model_dir: Path, rel: str) -> dict[str, Any]:
    size = _regular_file(model_dir, rel).st_size
    if size > MAX_CONFIG_BYTES:
        raise _fail(model_dir, f"{rel} is {size} bytes, larger than any config ({MAX_CONFIG_BYTES} at most)")
    try:
        data = json.loads((model_dir / rel).read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(model_dir, f"{rel} cannot be read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, too many digits, nesting too deep
        raise _fail(model_dir, f"{rel} is not valid JSON ({_short(exc)})") from None
    if not isinstance(data, dict):
        raise _fail(model_dir, f"{rel} is not a JSON object")
    return data


def _read_config(model_dir: Path, rel: str) -> dict[str, Any]:
    """A config file, checked against :data:`CONFIG_RANGES` before any model class sees it."""
    config = _read_json(model_dir, rel)
    problems = _range_problems(rel, config)
    if problems:
        raise _fail_all(model_dir, problems)
    return config


def _header(model_dir: Path, rel: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    path = model_dir / rel
    _regular_file(model_dir, rel)
    try:
        return read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        raise _fail(model_dir, f"{rel} is corrupt: {exc}") from None


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
    from .models.temporal_vae import TemporalTinyVAE

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


def _check_together(model_dir: Path, models: dict[str, nn.Module], text: nn.Module | None,
                    prompt: torch.Tensor | None) -> None:
    """The components must fit each other as Stream-DiffVSR wires them (each can match its own config and
    still not fit: a file from another model, an edited config)."""
    unet, cn, vae = models["unet"].config, models["controlnet"].config, models["vae"]
    latent = vae.latent_channels
    problems = []
    if unet.in_channels != latent + 3 or unet.out_channels != latent:
        problems.append(f"unet takes {unet.in_channels} and gives {unet.out_channels} channels; the VAE's "
                        f"{latent}-channel latent needs {latent + 3} (latent + LR RGB) and {latent}")
    if cn.in_channels != unet.in_channels or cn.conditioning_channels != 3:
        problems.append(f"controlnet takes {cn.in_channels} channels and a {cn.conditioning_channels}-channel "
                        f"condition; it needs the U-Net's {unet.in_channels} and an RGB frame (3)")
    if list(cn.block_out_channels) != list(unet.block_out_channels):
        problems.append(f"controlnet blocks {list(cn.block_out_channels)} differ from the U-Net's "
                        f"{list(unet.block_out_channels)}: its residuals would not fit")
    for name, cfg in (("unet", unet), ("controlnet", cn)):
        if cfg.num_class_embeds is not None or cfg.class_embed_type is not None:
            problems.append(f"{name} expects class labels (num_class_embeds/class_embed_type set), which "
                            "Stream-DiffVSR never passes")
    if cn.cross_attention_dim != unet.cross_attention_dim:
        problems.append(f"controlnet cross_attention_dim {cn.cross_attention_dim} differs from the U-Net's "
                        f"{unet.cross_attention_dim}")
    if text is not None:
        tc = text.config
        if tc.hidden_size != unet.cross_attention_dim:
            problems.append(f"text_encoder hidden_size {tc.hidden_size} differs from the U-Net's "
                            f"cross_attention_dim {unet.cross_attention_dim}")
        if tc.vocab_size <= max(EMPTY_PROMPT_IDS) or tc.max_position_embeddings < len(EMPTY_PROMPT_IDS):
            problems.append(f"text_encoder has {tc.vocab_size} tokens and {tc.max_position_embeddings} "
                            f"positions; the SD2 prompt ids need {max(EMPTY_PROMPT_IDS) + 1} and "
                            f"{len(EMPTY_PROMPT_IDS)}")
    if prompt is not None and tuple(prompt.shape) != (1, len(EMPTY_PROMPT_IDS), unet.cross_attention_dim):
        problems.append(f"{PROMPT_CACHE_NAME} holds a {tuple(prompt.shape)} embedding; the U-Net needs "
                        f"(1, {len(EMPTY_PROMPT_IDS)}, {unet.cross_attention_dim}) (delete it to recompute)")
    if problems:
        raise _fail_all(model_dir, [f"the components do not fit together: {p}" for p in problems])


def _check_scheduler(model_dir: Path) -> Any:
    scheduler = load_scheduler(model_dir)
    cfg = scheduler.config
    if cfg.prediction_type != "v_prediction" or cfg.timestep_spacing != "trailing":
        raise _fail(model_dir, "scheduler/scheduler_config.json is not Stream-DiffVSR's (prediction_type "
                               f"{cfg.prediction_type!r}, timestep_spacing {cfg.timestep_spacing!r}; the model "
                               "is trained for 'v_prediction' and 'trailing')")
    return scheduler


def _check_root(root: Path) -> None:
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise ModelFilesError(f"model folder {root} does not exist; {_fix_hint(root)}") from None
    except OSError as exc:
        raise ModelFilesError(f"model folder {root} cannot be read ({exc.strerror}); {_fix_hint(root)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ModelFilesError(f"model folder {root} is not a folder; {_fix_hint(root)}")
    try:
        with os.scandir(root):
            pass
    except OSError as exc:
        raise ModelFilesError(f"model folder {root} cannot be read ({exc.strerror}); {_fix_hint(root)}") from None


def validate_model_dir(model_dir: str | os.PathLike[str] | None = None, *, need_raft: bool = True) -> Path:
    """Check every file the pipeline will read before anything heavy is loaded: configs (against sane ranges),
    weights headers against the configs, how the components fit together, the prompt cache, and RAFT's
    ~20 MB checkpoint. Returns the resolved folder.

    Raises TypeError for a ``model_dir`` that is not a path, and one ModelFilesError listing every problem
    found (``exc.problems``, one per file or check), each naming its file.
    """
    root = resolve_model_dir(model_dir)
    _check_root(root)
    found = _Found()
    found.attempt(_read_json, root, "model_index.json")
    models: dict[str, nn.Module | None] = {}
    for name in _COMPONENTS:
        models[name], problems = _component_problems(root, name)
        found.problems.extend(problems)
    found.attempt(_check_scheduler, root)
    text = prompt = None
    try:
        prompt = _cached_prompt(root)
    except ModelFilesError as exc:  # an unusable cache and no text encoder to recompute it
        found.problems.extend(exc.problems)
    else:
        if prompt is None:
            text, problems = _text_encoder_problems(root)
            found.problems.extend(problems)
    if all(m is not None for m in models.values()):
        found.attempt(_check_together, root, models, text, prompt)
    if need_raft:
        found.attempt(_raft_state, root)
    if found.problems:
        raise _fail_all(root, found.problems)
    return root


# ---------------------------------------------------------------------------------------------- loading

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
    from .models.flow import build_raft

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
    from .models.flow import RaftFlow

    raft, state = _raft_state(model_dir)
    raft.load_state_dict(state)
    return RaftFlow(raft.eval().requires_grad_(False))


# ------------------------------------------------------------------------------------ prompt embedding

def _fingerprint(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_prompt(model_dir: Path) -> torch.Tensor | None:
    """The cached embedding (float32) if it is valid for the text encoder file present (or if there is none).

    None means "compute it"; a cache that holds NaN/Inf or no float tensor is not used. Without a text
    encoder such a cache is all there is: ModelFilesError then.
    """
    try:
        return _read_cached_prompt(model_dir)
    except OSError:  # an unreadable file in the way: the text encoder's check names it
        return None


def _read_cached_prompt(model_dir: Path) -> torch.Tensor | None:
    from safetensors import safe_open

    cache = model_dir / PROMPT_CACHE_NAME
    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
            emb = f.get_tensor("prompt_embeds")
    except Exception:
        return None
    if meta.get("ids") != json.dumps(list(EMPTY_PROMPT_IDS)):
        return None
    te = model_dir / "text_encoder" / TEXT_ENCODER_WEIGHTS
    if not emb.is_floating_point() or not bool(torch.isfinite(emb).all()):
        if te.is_file():
            return None  # recomputed from the text encoder (and the cache rewritten)
        what = "NaN or infinite values" if emb.is_floating_point() else f"{emb.dtype} values"
        raise _fail(model_dir, f"{PROMPT_CACHE_NAME} holds {what} and text_encoder/{TEXT_ENCODER_WEIGHTS} is "
                               "not there to recompute it (delete the cache and restore text_encoder/)")
    emb = emb.float()
    if not te.is_file():
        return emb  # the text encoder was removed after caching: the cache is all there is
    config = model_dir / "text_encoder" / "config.json"
    if config.is_file() and _sha256(config) != meta.get("config_sha256"):
        return None  # the encoder's config (activation, norm epsilon...) changed: so does the embedding
    fp = _fingerprint(te)
    if fp["size"] == meta.get("size") and fp["mtime_ns"] == meta.get("mtime_ns"):
        return emb
    if fp["size"] == meta.get("size") and _sha256(te) == meta.get("sha256"):
        _save_prompt(model_dir, emb, meta)  # same content, new timestamp (a copy): hash it once, not every load
        return emb
    return None


def _save_prompt(model_dir: Path, emb: torch.Tensor, meta: dict[str, str]) -> None:
    """Write the cache atomically, keyed by the text encoder's files as they are now."""
    import tempfile

    from safetensors.torch import save_file

    te_dir = model_dir / "text_encoder"
    meta = {**meta, **_fingerprint(te_dir / TEXT_ENCODER_WEIGHTS)}
    if (te_dir / "config.json").is_file():
        meta["config_sha256"] = _sha256(te_dir / "config.json")
    tmp: str | None = None
    try:  # a name of its own: two processes caching at once must not write one file
        fd, tmp = tempfile.mkstemp(prefix=PROMPT_CACHE_NAME + ".", suffix=".tmp", dir=model_dir)
        os.close(fd)
        save_file({"prompt_embeds": emb.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, model_dir / PROMPT_CACHE_NAME)
    except Exception:  # read-only model folder (safetensors raises its own error type): recompute next time
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _compute_prompt(model_dir: Path) -> torch.Tensor:
    from transformers import CLIPTextConfig, CLIPTextModel
    from safetensors.torch import load_file

    _check_text_encoder(model_dir)
    config = CLIPTextConfig.from_dict(_read_json(model_dir, "text_encoder/config.json"))
    model = CLIPTextModel(config).eval()  # real init once: its non-persistent buffers must exist
    to_model = _text_key_mapper(model)
    state = load_file(str(model_dir / "text_encoder" / TEXT_ENCODER_WEIGHTS))
    state = {to_model(k): v.float() for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise _fail(model_dir, f"text_encoder/{TEXT_ENCODER_WEIGHTS} does not match its config "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    ids = torch.tensor([EMPTY_PROMPT_IDS], dtype=torch.long)
    with torch.inference_mode():
        emb = model(input_ids=ids).last_hidden_state.float().contiguous()
    if not bool(torch.isfinite(emb).all()):
        raise _fail(model_dir, f"text_encoder/{TEXT_ENCODER_WEIGHTS} gives NaN or infinite values for the empty "
                               "prompt (its weights are corrupt)")
    return emb


def empty_prompt_embedding(model_dir: Path) -> torch.Tensor:
    """The (1, 77, D) CLIP embedding of the empty prompt, float32 on CPU.

    Computed once with the text encoder and cached as ``<model_dir>/empty_prompt_embedding.safetensors``,
    keyed by the text encoder's weights (size and mtime, then SHA-256) and config (SHA-256), so later loads
    skip the encoder. A cache holding NaN/Inf is recomputed (ModelFilesError without a text encoder); an
    encoder that gives NaN/Inf raises ModelFilesError and nothing is cached.
    """
    emb = _cached_prompt(model_dir)
    if emb is not None:
        return emb
    emb = _compute_prompt(model_dir)
    te = model_dir / "text_encoder" / TEXT_ENCODER_WEIGHTS
    _save_prompt(model_dir, emb, {"sha256": _sha256(te), "ids": json.dumps(list(EMPTY_PROMPT_IDS))})
    return emb


# --------------------------------------------------------------------------------------------- download

def download(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch the Hugging Face repo and torchvision's RAFT-large weights into one folder; cache the prompt.

    Progress bars go to stderr. Raises :class:`ConnectionError` with one line when offline, ModelFilesError
    when the folder cannot be created or the download is incomplete. A failed (or interrupted) download
    removes every folder it created that holds no finished file; finished files are kept so that the next
    run fetches only what is missing (both clients write each file under a temporary name and rename it when
    whole). What was in the folder before is never touched.
    """
    root = resolve_model_dir(model_dir)
    created = _missing_folders(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_created(created)
        raise ModelFilesError(f"cannot create the model folder {root} ({exc.strerror or _short(exc)}); fix: give "
                              "a folder you can write to") from None
    raft_dir = root / "raft"
    if not os.path.lexists(raft_dir):
        created.append(raft_dir)
    try:
        _fetch(root)
    except BaseException as exc:
        kept = _remove_created(created)
        if isinstance(exc, ConnectionError) and kept:
            raise ConnectionError(f"{exc} (the files fetched so far are kept in {root}: run the download again "
                                  "to fetch the rest)") from None
        raise
    try:
        validate_model_dir(root)
    except ModelFilesError as exc:  # e.g. an offline hub client that returned the partial folder it had
        what = "; ".join(exc.problems) if len(exc.problems) == 1 else \
            "; ".join(f"({i}) {p}" for i, p in enumerate(exc.problems, 1))
        advice = "check the network and run the download again (it fetches only what is missing)"
        raise ModelFilesError(f"the download into {root} is incomplete or damaged ({what}); {advice}", exc.problems,
                              f"the download into {root} is incomplete or damaged "
                              f"({len(exc.problems)} problems); {advice}") from None
    empty_prompt_embedding(root)
    return root


def _fetch(root: Path) -> None:
    """The Hugging Face snapshot, then RAFT unless a copy is already found; ConnectionError when offline."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=HF_REPO_ID, local_dir=str(root))
    except Exception as exc:
        raise ConnectionError(f"cannot download {HF_REPO_ID} from the Hugging Face Hub ({_short(exc)}); "
                              f"check the network, or copy the repository's files into {root}") from None
    raft_dst = root / "raft" / RAFT_FILENAME
    if find_raft_weights(root) is None:  # torch hub's copy counts: nothing to fetch then
        try:  # the hash prefix in the file name is checked: a cut-off or altered download is not kept
            raft_dst.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(RAFT_URL, str(raft_dst), hash_prefix=RAFT_SHA256_PREFIX, progress=True)
        except Exception as exc:
            raise ConnectionError(f"cannot download {RAFT_URL} ({_short(exc)}); check the network, or copy "
                                  f"{RAFT_FILENAME} into {raft_dst.parent}") from None


def _missing_folders(root: Path) -> list[Path]:
    """``root`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    for folder in (root, *root.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    return missing[::-1]


#: what the download clients leave while they work: Hugging Face's bookkeeping and partial files
_BOOKKEEPING_SUFFIXES = (".incomplete", ".partial", ".lock", ".tmp")


def _finished_files(folder: Path) -> bool:
    """Whether ``folder`` holds a file a download finished (not Hugging Face's ``.cache/huggingface``)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        if Path(dirpath) == folder / ".cache":
            dirnames[:] = [d for d in dirnames if d != "huggingface"]
        if any(not name.endswith(_BOOKKEEPING_SUFFIXES) for name in filenames):
            return True
    return False


def _remove_created(created: list[Path]) -> bool:
    """Remove, innermost first, the folders this download created that hold no finished file; True if one
    that does was kept."""
    kept = False
    for folder in reversed(created):
        if not folder.is_dir() or folder.is_symlink():
            continue
        if _finished_files(folder):
            kept = True
            continue
        shutil.rmtree(folder, ignore_errors=True)
    return kept


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    first = text[0] if len(text[0]) <= 240 else text[0][:240].rstrip() + "..."
    return f"{type(exc).__name__}: {first}"

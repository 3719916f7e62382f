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

Every file is checked before anything heavy is loaded; each problem raises :class:`ModelFilesError`
naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class ModelFilesError(RuntimeError):
    """A model file is missing, truncated, corrupt or does not match its config."""


def _fix_hint(model_dir: Path) -> str:
    return f"fix: run `python -m vsstreamdiffvsr download --dir {model_dir}` (or point model_dir / ${ENV_MODEL_DIR} at a complete copy)"


def _fail(model_dir: Path, what: str) -> ModelFilesError:
    return ModelFilesError(f"model folder {model_dir}: {what}; {_fix_hint(model_dir)}")


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


def resolve_model_dir(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder to use: the argument, else :func:`default_model_dir`."""
    return Path(model_dir).expanduser().resolve() if model_dir is not None else default_model_dir().resolve()


def find_raft_weights(model_dir: Path) -> Path | None:
    """``<model_dir>/raft/<file>``, else torch hub's checkpoint folder, else None."""
    for candidate in (model_dir / "raft" / RAFT_FILENAME, Path(torch.hub.get_dir()) / "checkpoints" / RAFT_FILENAME):
        if candidate.is_file():
            return candidate
    return None


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


def _read_json(model_dir: Path, rel: str) -> dict[str, Any]:
    path = model_dir / rel
    if not path.is_file():
        raise _fail(model_dir, f"{rel} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(model_dir, f"{rel} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(model_dir, f"{rel} is not a JSON object")
    return data


def _header(model_dir: Path, rel: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    path = model_dir / rel
    if not path.is_file():
        raise _fail(model_dir, f"{rel} is missing")
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
        raise _fail(model_dir, f"{rel_config} describes no valid model ({type(exc).__name__}: {exc})") from None


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
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {list(header[k][1])}, config {list(expected[k])})")
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


def _check_component(model_dir: Path, name: str) -> tuple[nn.Module, dict[str, Any]]:
    weights, builder = _COMPONENTS[name]
    rel_config, rel_weights = f"{name}/config.json", f"{name}/{weights}"
    config = _read_json(model_dir, rel_config)
    header = _header(model_dir, rel_weights)
    model = _meta_build(model_dir, rel_config, builder, config)
    _compare(model_dir, rel_weights, rel_config, model, header)
    return model, config


def _text_key_mapper(model: nn.Module) -> Callable[[str], str]:
    """File key -> model key: the checkpoint has ``text_model.`` prefixes, transformers >= 5 models do not."""
    prefixed = any(k.startswith("text_model.") for k in model.state_dict())
    if prefixed:
        return lambda k: k if k.startswith("text_model.") else "text_model." + k
    return lambda k: k.removeprefix("text_model.")


def _check_text_encoder(model_dir: Path) -> nn.Module:
    rel_config, rel_weights = "text_encoder/config.json", f"text_encoder/{TEXT_ENCODER_WEIGHTS}"
    config = _read_json(model_dir, rel_config)
    header = _header(model_dir, rel_weights)
    model = _meta_build(model_dir, rel_config, _text_encoder_builder, config)
    to_model = _text_key_mapper(model)
    header = {to_model(k): v for k, v in header.items()}
    _compare(model_dir, rel_weights, rel_config, model, header, ignore=lambda k: k.endswith("position_ids"))
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
        raise _fail(model_dir, "the components do not fit together: " + "; ".join(problems))


def _check_scheduler(model_dir: Path) -> Any:
    scheduler = load_scheduler(model_dir)
    cfg = scheduler.config
    if cfg.prediction_type != "v_prediction" or cfg.timestep_spacing != "trailing":
        raise _fail(model_dir, "scheduler/scheduler_config.json is not Stream-DiffVSR's (prediction_type "
                               f"{cfg.prediction_type!r}, timestep_spacing {cfg.timestep_spacing!r}; the model "
                               "is trained for 'v_prediction' and 'trailing')")
    return scheduler


def validate_model_dir(model_dir: str | os.PathLike[str] | None = None, *, need_raft: bool = True) -> Path:
    """Check every file the pipeline will read before anything heavy is loaded: headers and configs, how the
    components fit together, and RAFT's ~20 MB checkpoint. Returns the folder."""
    root = resolve_model_dir(model_dir)
    if not root.is_dir():
        raise ModelFilesError(f"model folder {root} does not exist; {_fix_hint(root)}")
    _read_json(root, "model_index.json")
    models = {name: _check_component(root, name)[0] for name in _COMPONENTS}
    _check_scheduler(root)
    prompt = _cached_prompt(root)
    text = _check_text_encoder(root) if prompt is None else None
    _check_together(root, models, text, prompt)
    if need_raft:
        _raft_state(root)
    return root


# ---------------------------------------------------------------------------------------------- loading

def _load_component(model_dir: Path, name: str, dtype: torch.dtype) -> nn.Module:
    from safetensors.torch import load_file

    model, _ = _check_component(model_dir, name)
    try:
        state = load_file(str(model_dir / name / _COMPONENTS[name][0]), device="cpu")
    except Exception as exc:
        raise _fail(model_dir, f"{name}/{_COMPONENTS[name][0]} cannot be read ({exc})") from None
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
    """diffusers ``DDIMScheduler`` from ``scheduler/scheduler_config.json``."""
    from diffusers import DDIMScheduler

    config = _read_json(model_dir, "scheduler/scheduler_config.json")
    try:
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(4)  # the config's values are only used (and checked) here
    except Exception as exc:
        raise _fail(model_dir, f"scheduler/scheduler_config.json is not a usable DDIM config ({exc})") from None
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
        raise _fail(model_dir, f"{path} is not a RAFT-large checkpoint (e.g. {(bad or sorted(set(state) - set(expected)))[0]})")
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
    """The cached embedding if it is valid for the text encoder file present (or if there is none)."""
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
        return model(input_ids=ids).last_hidden_state.float().contiguous()


def empty_prompt_embedding(model_dir: Path) -> torch.Tensor:
    """The (1, 77, D) CLIP embedding of the empty prompt, float32 on CPU.

    Computed once with the text encoder and cached as ``<model_dir>/empty_prompt_embedding.safetensors``,
    keyed by the text encoder's weights (size and mtime, then SHA-256) and config (SHA-256), so later loads
    skip the encoder.
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

    Progress bars go to stderr. Raises :class:`ConnectionError` with one line when offline.
    """
    root = resolve_model_dir(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=HF_REPO_ID, local_dir=str(root))
    except Exception as exc:
        raise ConnectionError(f"cannot download {HF_REPO_ID} from the Hugging Face Hub ({_short(exc)}); "
                              f"check the network, or copy the repository's files into {root}") from None
    raft_dst = root / "raft" / RAFT_FILENAME
    if find_raft_weights(root) is None:  # torch hub's copy counts: nothing to fetch then
        raft_dst.parent.mkdir(parents=True, exist_ok=True)
        try:  # the hash prefix in the file name is checked: a cut-off or altered download is not kept
            torch.hub.download_url_to_file(RAFT_URL, str(raft_dst), hash_prefix=RAFT_SHA256_PREFIX, progress=True)
        except Exception as exc:
            raise ConnectionError(f"cannot download {RAFT_URL} ({_short(exc)}); check the network, or copy "
                                  f"{RAFT_FILENAME} into {raft_dst.parent}") from None
    try:
        validate_model_dir(root)
    except ModelFilesError as exc:  # e.g. an offline hub client that returned the partial folder it had
        what = str(exc).split("; fix:")[0]
        raise ModelFilesError(f"the download into {root} is incomplete or damaged ({what}); check the network "
                              "and run the download again (it fetches only what is missing)") from None
    empty_prompt_embedding(root)
    return root


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    first = text[0] if len(text[0]) <= 240 else text[0][:240].rstrip() + "..."
    return f"{type(exc).__name__}: {first}"

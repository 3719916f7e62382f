"""The CLIP embedding of the empty prompt, computed once with the text encoder and cached in the model folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from .files import _read_json
from .layout import EMPTY_PROMPT_IDS, PROMPT_CACHE_NAME, TEXT_ENCODER_WEIGHTS
from .problems import _fail
from .shapes import _check_text_encoder, _text_key_mapper


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

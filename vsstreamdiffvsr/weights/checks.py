"""The whole model folder checked at once: :func:`validate_model_dir` reports every problem it finds.

Every file the pipeline will read is checked before anything heavy is loaded: configs against sane ranges
before any model class sees them, weights headers against the configs, how the components fit together, the
scheduler, the prompt cache and RAFT's checkpoint. All problems go into one :class:`ModelFilesError` (one
entry per file or check); the loaders of :mod:`.load` stop at the first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import _read_json
from .folder import resolve_model_dir
from .layout import EMPTY_PROMPT_IDS, PROMPT_CACHE_NAME
from .load import _raft_state, load_scheduler
from .problems import ModelFilesError, _fail, _fail_all, _fix_hint, _Found
from .prompt import _cached_prompt
from .shapes import _COMPONENTS, _component_problems, _text_encoder_problems


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

"""The model folder: where it is, whether it is complete, how to load each component, how to download it.

A model folder has exactly the Hugging Face layout of ``Jamichsu/Stream-DiffVSR`` (see :mod:`.layout`).
Every file is checked before anything heavy is loaded: configs against sane ranges before any model class
sees them, weights headers against the configs. :func:`validate_model_dir` reports every problem of the folder
in one :class:`ModelFilesError` (one entry per file or check); the loaders stop at the first.

The modules, one job each: :mod:`.layout` (file names), :mod:`.problems` (the error and its wording),
:mod:`.folder` (where the folder is), :mod:`.files` (reading one file), :mod:`.configs` (config ranges),
:mod:`.shapes` (a config against its weights), :mod:`.checks` (the whole folder), :mod:`.load` (the loaders),
:mod:`.prompt` (the cached empty-prompt embedding), :mod:`.fetch` (the download). This package exposes only
the names below; a test patches a helper or constant in the module that uses it.
"""

from __future__ import annotations

from .checks import validate_model_dir
from .configs import _range_problems as _range_problems  # tests check the ranges admit the shipped configs
from .fetch import download
from .files import read_safetensors_header
from .folder import default_model_dir, find_raft_weights, resolve_model_dir, user_cache_dir
from .layout import EMPTY_PROMPT_IDS, ENV_MODEL_DIR, HF_REPO_ID
from .load import load_controlnet, load_raft, load_scheduler, load_unet, load_vae
from .problems import ModelFilesError
from .prompt import _cached_prompt as _cached_prompt  # tests check which caches are trusted
from .prompt import empty_prompt_embedding

__all__ = [
    "HF_REPO_ID", "ENV_MODEL_DIR", "EMPTY_PROMPT_IDS", "ModelFilesError", "default_model_dir", "user_cache_dir",
    "resolve_model_dir", "find_raft_weights", "validate_model_dir", "read_safetensors_header",
    "load_unet", "load_controlnet", "load_vae", "load_scheduler", "load_raft", "empty_prompt_embedding",
    "download",
]

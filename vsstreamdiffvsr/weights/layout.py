"""What a model folder holds: the Hugging Face repository, the file names, the fixed prompt ids.

A model folder has exactly the Hugging Face layout of ``Jamichsu/Stream-DiffVSR``::

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    controlnet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    scheduler/scheduler_config.json
    text_encoder/{config.json, model.safetensors}     (only until the prompt embedding is cached)
    tokenizer/...                                      (optional, unused: the prompt ids are fixed)
    raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth            (or torch hub's checkpoint folder)
"""

from __future__ import annotations

from ..models.flow import RAFT_FILENAME

HF_REPO_ID = "Jamichsu/Stream-DiffVSR"
ENV_MODEL_DIR = "VSSTREAMDIFFVSR_MODEL_DIR"
#: The SD2 tokenizer's ids for the empty prompt "", padded to 77 with "!" (id 0).
EMPTY_PROMPT_IDS: tuple[int, ...] = (49406, 49407) + (0,) * 75
PROMPT_CACHE_NAME = "empty_prompt_embedding.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "model.safetensors"

#: torchvision's RAFT file name carries the first 8 hex digits of its SHA-256
RAFT_SHA256_PREFIX = RAFT_FILENAME.rsplit("-", 1)[1].split(".")[0]

#: a config file larger than this is not a config (the release's largest is about 2 kB)
MAX_CONFIG_BYTES = 1 << 20

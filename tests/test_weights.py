"""The model folder: validation of every file, RAFT lookup, default folder, empty-prompt embedding cache."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vsstreamdiffvsr import weights
from vsstreamdiffvsr.models.flow import RAFT_FILENAME
from vsstreamdiffvsr.weights import ModelFilesError

UNET_W = "unet/diffusion_pytorch_model.safetensors"
CN_W = "controlnet/diffusion_pytorch_model.safetensors"
VAE_W = "vae/diffusion_pytorch_model.safetensors"
TE_W = "text_encoder/model.safetensors"
CACHE = "empty_prompt_embedding.safetensors"


@pytest.fixture
def no_hub_raft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch hub at an empty folder so the RAFT fallback cannot hide a missing file."""
    hub = tmp_path / "emptyhub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def _assert_clear(exc: BaseException, *names: str) -> str:
    msg = str(exc)
    for name in names:
        assert name in msg, (name, msg)
    assert "download" in msg, msg  # the fix
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ validation

def test_validate_tiny_checkpoint_passes(tiny_ckpt: Path, no_hub_raft: Path) -> None:
    assert weights.validate_model_dir(tiny_ckpt) == tiny_ckpt.resolve()


def _damage(root: Path, kind: str) -> str:
    """Apply one kind of damage; return the name the error must mention."""
    if kind == "missing_model_index":
        (root / "model_index.json").unlink()
        return "model_index.json"
    if kind == "missing_unet_weights":
        (root / UNET_W).unlink()
        return UNET_W
    if kind == "truncated_unet":
        p = root / UNET_W
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return UNET_W
    if kind == "truncated_vae_tail":
        p = root / VAE_W
        data = p.read_bytes()
        p.write_bytes(data[:-7])
        return VAE_W
    if kind == "truncated_in_header":
        p = root / CN_W
        p.write_bytes(p.read_bytes()[:100])
        return CN_W
    if kind == "garbage_controlnet":
        p = root / CN_W
        p.write_bytes(os.urandom(p.stat().st_size))
        return CN_W
    if kind == "garbage_header_json":
        p = root / VAE_W
        data = bytearray(p.read_bytes())
        data[8:40] = b"\xff" * 32
        p.write_bytes(bytes(data))
        return VAE_W
    if kind == "controlnet_config_mismatch":
        _edit_json(root / "controlnet/config.json", block_out_channels=[16, 16, 32, 64])
        return CN_W
    if kind == "vae_config_channels":
        _edit_json(root / "vae/config.json", block_out_channels=[32, 32, 32],
                   encoder_block_out_channels=[32, 32, 32], decoder_block_out_channels=[32, 32, 32])
        return VAE_W
    if kind == "vae_config_blocks":
        _edit_json(root / "vae/config.json", num_encoder_blocks=[1, 2, 3], num_decoder_blocks=[3, 2, 1])
        return VAE_W
    if kind == "vae_config_unbuildable":
        _edit_json(root / "vae/config.json", num_decoder_blocks=[3, 3, 3])
        return "vae/config.json"
    if kind == "unet_config_invalid_json":
        (root / "unet/config.json").write_text('{"in_channels": 7,')
        return "unet/config.json"
    if kind == "scheduler_missing":
        (root / "scheduler/scheduler_config.json").unlink()
        return "scheduler/scheduler_config.json"
    if kind == "missing_raft":
        shutil.rmtree(root / "raft")
        return RAFT_FILENAME
    if kind == "missing_text_encoder_no_cache":
        (root / CACHE).unlink(missing_ok=True)
        shutil.rmtree(root / "text_encoder")
        return "text_encoder/config.json"
    if kind == "truncated_text_encoder":
        p = root / TE_W
        p.write_bytes(p.read_bytes()[:-100])
        return TE_W
    raise AssertionError(kind)


DAMAGES = ["missing_model_index", "missing_unet_weights", "truncated_unet", "truncated_vae_tail",
           "truncated_in_header", "garbage_controlnet", "garbage_header_json", "controlnet_config_mismatch",
           "vae_config_channels", "vae_config_blocks", "vae_config_unbuildable", "unet_config_invalid_json",
           "scheduler_missing", "missing_raft", "missing_text_encoder_no_cache", "truncated_text_encoder"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_validate_reports_each_problem(ckpt_copy: Path, no_hub_raft: Path, kind: str) -> None:
    name = _damage(ckpt_copy, kind)
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, name)


def test_config_mismatch_names_both_files(ckpt_copy: Path, no_hub_raft: Path) -> None:
    _damage(ckpt_copy, "controlnet_config_mismatch")
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, CN_W, "controlnet/config.json")


def test_validate_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(missing)
    _assert_clear(info.value, str(missing))


def test_validate_unexpected_tensor(ckpt_copy: Path, no_hub_raft: Path) -> None:
    p = ckpt_copy / VAE_W
    state = load_file(str(p))
    state["decoder.layers.99.weight"] = torch.zeros(2)
    save_file(state, str(p))
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, VAE_W, "decoder.layers.99.weight")


@pytest.mark.parametrize("kind", ["missing_unet_weights", "truncated_vae_tail", "vae_config_channels"])
def test_from_pretrained_on_damaged_folder(ckpt_copy: Path, no_hub_raft: Path, kind: str) -> None:
    from vsstreamdiffvsr import StreamDiffVSR

    name = _damage(ckpt_copy, kind)
    with pytest.raises(ModelFilesError) as info:
        StreamDiffVSR.from_pretrained(ckpt_copy, device="cpu", dtype="float32")
    _assert_clear(info.value, name)


# ------------------------------------------------------------------------------------------------ RAFT

def test_raft_falls_back_to_torch_hub(ckpt_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    shutil.move(str(ckpt_copy / "raft" / RAFT_FILENAME), str(hub / "checkpoints" / RAFT_FILENAME))
    shutil.rmtree(ckpt_copy / "raft")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert weights.find_raft_weights(ckpt_copy) == hub / "checkpoints" / RAFT_FILENAME
    weights.validate_model_dir(ckpt_copy)
    raft = weights.load_raft(ckpt_copy)
    ref = torch.load(str(hub / "checkpoints" / RAFT_FILENAME), map_location="cpu", weights_only=True)
    k = sorted(ref)[0]
    torch.testing.assert_close(raft.raft.state_dict()[k], ref[k], atol=0, rtol=0)


def test_raft_falls_back_to_torch_home(ckpt_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "torchhome"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.move(str(ckpt_copy / "raft" / RAFT_FILENAME), str(home / "hub" / "checkpoints" / RAFT_FILENAME))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert weights.find_raft_weights(ckpt_copy) == home / "hub" / "checkpoints" / RAFT_FILENAME
    weights.validate_model_dir(ckpt_copy)


def test_model_folder_raft_takes_precedence(ckpt_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / RAFT_FILENAME).write_bytes(b"other")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert weights.find_raft_weights(ckpt_copy) == ckpt_copy / "raft" / RAFT_FILENAME


def test_corrupt_raft_file(ckpt_copy: Path, no_hub_raft: Path) -> None:
    (ckpt_copy / "raft" / RAFT_FILENAME).write_bytes(os.urandom(4096))
    with pytest.raises(ModelFilesError) as info:
        weights.load_raft(ckpt_copy)
    _assert_clear(info.value, RAFT_FILENAME)
    from vsstreamdiffvsr import StreamDiffVSR

    with pytest.raises(ModelFilesError):
        StreamDiffVSR.from_pretrained(ckpt_copy, device="cpu", dtype=torch.float32)


def test_raft_file_with_wrong_tensors(ckpt_copy: Path, no_hub_raft: Path) -> None:
    torch.save({"feature_encoder.convnormrelu.0.weight": torch.zeros(3)}, str(ckpt_copy / "raft" / RAFT_FILENAME))
    with pytest.raises(ModelFilesError) as info:
        weights.load_raft(ckpt_copy)
    _assert_clear(info.value, RAFT_FILENAME)


# -------------------------------------------------------------------------------------- default folder

def test_default_model_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(weights.ENV_MODEL_DIR, str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.ENV_MODEL_DIR == "VSSTREAMDIFFVSR_MODEL_DIR"
    assert weights.default_model_dir() == tmp_path / "models"
    assert weights.resolve_model_dir(None) == (tmp_path / "models").resolve()
    assert weights.resolve_model_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(weights.ENV_MODEL_DIR, "~/m")
    assert weights.default_model_dir() == tmp_path / "home" / "m"


def test_validate_uses_env_folder(monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path, no_hub_raft: Path) -> None:
    monkeypatch.setenv(weights.ENV_MODEL_DIR, str(tiny_ckpt))
    assert weights.validate_model_dir() == tiny_ckpt.resolve()


def test_default_model_dir_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(weights.ENV_MODEL_DIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in (tmp_path / "xdg1", tmp_path / "xdg2"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
        d = weights.default_model_dir()
        assert d.is_relative_to(xdg) and "vsstreamdiffvsr" in d.relative_to(xdg).parts, d
    monkeypatch.setenv(weights.ENV_MODEL_DIR, "")  # empty means unset
    assert weights.default_model_dir().is_relative_to(tmp_path / "xdg2")
    monkeypatch.delenv("XDG_CACHE_HOME")
    d = weights.default_model_dir()
    assert d.is_relative_to(tmp_path / "home" / ".cache") and "vsstreamdiffvsr" in d.parts, d
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: a relative path is ignored
    assert weights.default_model_dir() == d


# ------------------------------------------------------------------------------------------ empty prompt

def test_empty_prompt_ids() -> None:
    assert list(weights.EMPTY_PROMPT_IDS) == [49406, 49407] + [0] * 75
    assert len(weights.EMPTY_PROMPT_IDS) == 77


def _independent_embedding(root: Path) -> torch.Tensor:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_dict(json.loads((root / "text_encoder" / "config.json").read_text()))
    model = CLIPTextModel(cfg).eval()
    model_keys = set(model.state_dict())
    state = {}
    for k, v in load_file(str(root / TE_W)).items():
        if k in model_keys:
            state[k] = v
        elif k.removeprefix("text_model.") in model_keys:
            state[k.removeprefix("text_model.")] = v
        elif "text_model." + k in model_keys:
            state["text_model." + k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    assert len(state) >= len(model_keys) - 1
    ids = torch.tensor([[49406, 49407] + [0] * 75])
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.float()


def _forbid_text_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def boom(self, *a, **k):  # noqa: ANN001
        raise AssertionError("CLIPTextModel was built although the cache is valid")

    monkeypatch.setattr(transformers.CLIPTextModel, "__init__", boom)


def _rewrite_text_encoder(root: Path, seed: int) -> None:
    p = root / TE_W
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(p))
    g = torch.Generator().manual_seed(seed)
    new = {k: (torch.randn(v.shape, generator=g) * 0.2).to(v.dtype) if v.is_floating_point() else v
           for k, v in state.items()}
    old_size = p.stat().st_size
    save_file(new, str(p), metadata=meta)
    assert p.stat().st_size == old_size  # same size: only the content/mtime can tell the change
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_empty_prompt_embedding_computed_and_cached(ckpt_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    emb = weights.empty_prompt_embedding(ckpt_copy)
    exp = _independent_embedding(ckpt_copy)
    assert emb.shape == (1, 77, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, exp, atol=1e-5, rtol=1e-5)
    assert (ckpt_copy / CACHE).is_file()
    torch.testing.assert_close(load_file(str(ckpt_copy / CACHE))["prompt_embeds"], emb, atol=0, rtol=0)
    assert not list(ckpt_copy.glob("*.tmp"))  # the temporary file was renamed into place

    _forbid_text_model(monkeypatch)
    again = weights.empty_prompt_embedding(ckpt_copy)
    torch.testing.assert_close(again, emb, atol=0, rtol=0)
    weights.validate_model_dir(ckpt_copy)  # with a valid cache the text encoder is not even meta-built

    # Same content, new timestamp (e.g. a copy): the cache is still valid.
    p = ckpt_copy / TE_W
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 3_000_000_000))
    torch.testing.assert_close(weights.empty_prompt_embedding(ckpt_copy), emb, atol=0, rtol=0)


def test_empty_prompt_recomputed_after_text_encoder_change(ckpt_copy: Path) -> None:
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    first = weights.empty_prompt_embedding(ckpt_copy)
    _rewrite_text_encoder(ckpt_copy, seed=123)
    second = weights.empty_prompt_embedding(ckpt_copy)
    exp = _independent_embedding(ckpt_copy)
    torch.testing.assert_close(second, exp, atol=1e-5, rtol=1e-5)
    assert float((second - first).abs().max()) > 1e-3
    torch.testing.assert_close(load_file(str(ckpt_copy / CACHE))["prompt_embeds"], second, atol=0, rtol=0)


def test_cached_prompt_used_after_text_encoder_deleted(ckpt_copy: Path, no_hub_raft: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    emb = weights.empty_prompt_embedding(ckpt_copy)
    shutil.rmtree(ckpt_copy / "text_encoder")
    _forbid_text_model(monkeypatch)
    weights.validate_model_dir(ckpt_copy)
    torch.testing.assert_close(weights.empty_prompt_embedding(ckpt_copy), emb, atol=0, rtol=0)


def test_unwritable_prompt_cache_still_returns_embedding(ckpt_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder where the cache cannot be written (e.g. read-only, shared) must still load.

    Root ignores permission bits, so the write is made to fail the way safetensors fails on any
    unwritable location: the cache goes to a sub-folder that does not exist.
    """
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    monkeypatch.setattr(weights.prompt, "PROMPT_CACHE_NAME", "no_such_subfolder/" + CACHE)
    emb = weights.empty_prompt_embedding(ckpt_copy)
    torch.testing.assert_close(emb, _independent_embedding(ckpt_copy), atol=1e-5, rtol=1e-5)
    assert not (ckpt_copy / "no_such_subfolder").exists()


def test_corrupt_prompt_cache_is_recomputed(ckpt_copy: Path) -> None:
    (ckpt_copy / CACHE).write_bytes(b"not a safetensors file")
    emb = weights.empty_prompt_embedding(ckpt_copy)
    torch.testing.assert_close(emb, _independent_embedding(ckpt_copy), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ safetensors header

def _small_file(tmp_path: Path) -> Path:
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(5, dtype=torch.float16), "c": torch.arange(4)}, str(p))
    return p


def test_read_safetensors_header(tmp_path: Path) -> None:
    p = _small_file(tmp_path)
    header = weights.read_safetensors_header(p)
    assert header == {"a": ("F32", (2, 3)), "b": ("F16", (5,)), "c": ("I64", (4,))}


def test_read_safetensors_header_trailing_bytes(tmp_path: Path) -> None:
    p = _small_file(tmp_path)
    p.write_bytes(p.read_bytes() + b"\0\0\0")
    with pytest.raises(ValueError, match="trailing"):
        weights.read_safetensors_header(p)


@pytest.mark.parametrize("keep", [3, 20, -1])
def test_read_safetensors_header_truncated(tmp_path: Path, keep: int) -> None:
    p = _small_file(tmp_path)
    p.write_bytes(p.read_bytes()[:keep])
    with pytest.raises(ValueError):
        weights.read_safetensors_header(p)


def test_read_safetensors_header_garbage(tmp_path: Path) -> None:
    p = tmp_path / "g.safetensors"
    p.write_bytes((16).to_bytes(8, "little") + b"[1, 2, 3]       ")
    with pytest.raises(ValueError):
        weights.read_safetensors_header(p)
    p.write_bytes((16).to_bytes(8, "little") + b"\xfe" * 16)
    with pytest.raises(ValueError):
        weights.read_safetensors_header(p)


# ------------------------------------------------------------------ what passed `check` and failed later

def test_float_tensor_stored_as_integers(ckpt_copy: Path, no_hub_raft: Path) -> None:
    p = ckpt_copy / VAE_W
    state = load_file(str(p))
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key] = state[key].to(torch.int32)
    save_file(state, str(p))
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, VAE_W, key, "I32")


@pytest.mark.parametrize(("overrides", "needle"), [
    (dict(text={"hidden_size": 64}), "hidden_size 64 differs from the U-Net's cross_attention_dim 32"),
    (dict(text={"vocab_size": 1000}), "1000 tokens"),
    (dict(vae={"latent_channels": 8}), "the VAE's 8-channel latent needs 11"),
    (dict(unet={"num_class_embeds": 1000}), "class labels"),
], ids=["text-width", "text-vocab", "vae-latent", "class-labels"])
def test_components_that_do_not_fit_together(tmp_path: Path, no_hub_raft: Path, overrides: dict,
                                             needle: str) -> None:
    """Each file matches its own config, but the model as wired would fail on its first frame."""
    from vsstreamdiffvsr.testing import make_tiny_checkpoint

    root = make_tiny_checkpoint(tmp_path / "m", seed=0, raft=False, **overrides)
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(root, need_raft=False)
    _assert_clear(info.value, "do not fit together", needle)


def test_cached_prompt_of_another_width(ckpt_copy: Path, no_hub_raft: Path) -> None:
    weights.empty_prompt_embedding(ckpt_copy)
    with safe_open(str(ckpt_copy / CACHE), framework="pt") as f:
        meta = f.metadata()
    save_file({"prompt_embeds": torch.zeros(1, 77, 1024)}, str(ckpt_copy / CACHE), metadata=meta)
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, CACHE, "(1, 77, 1024)")


@pytest.mark.parametrize(("changes", "needle"), [
    ({"prediction_type": "epsilon"}, "'epsilon'"),
    ({"timestep_spacing": "leading"}, "'leading'"),
    ({"beta_schedule": "nonsense"}, "not a usable DDIM config"),
])
def test_scheduler_values_are_checked(ckpt_copy: Path, no_hub_raft: Path, changes: dict, needle: str) -> None:
    _edit_json(ckpt_copy / "scheduler" / "scheduler_config.json", **changes)
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, "scheduler/scheduler_config.json", needle)


def test_validate_reads_the_raft_file(ckpt_copy: Path, no_hub_raft: Path) -> None:
    p = ckpt_copy / "raft" / RAFT_FILENAME
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # a cut-off download
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, RAFT_FILENAME)
    torch.save({"feature_encoder.convnormrelu.0.weight": [1, 2, 3]}, str(p))  # not even a tensor
    with pytest.raises(ModelFilesError) as info:
        weights.load_raft(ckpt_copy)
    _assert_clear(info.value, RAFT_FILENAME)


def test_vae_config_with_an_unknown_upsampling(ckpt_copy: Path, no_hub_raft: Path) -> None:
    _edit_json(ckpt_copy / "vae" / "config.json", upsample_fn="foo")
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, "vae/config.json", "upsample_fn")


def test_empty_prompt_recomputed_after_text_config_change(ckpt_copy: Path) -> None:
    """The embedding depends on the encoder's config as well as its weights (activation, norm epsilon)."""
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    first = weights.empty_prompt_embedding(ckpt_copy)
    _edit_json(ckpt_copy / "text_encoder" / "config.json", hidden_act="quick_gelu", layer_norm_eps=1e-3)
    second = weights.empty_prompt_embedding(ckpt_copy)
    torch.testing.assert_close(second, _independent_embedding(ckpt_copy), atol=1e-5, rtol=1e-5)
    assert float((second - first).abs().max()) > 1e-3


def test_copied_text_encoder_is_hashed_once(ckpt_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy (same bytes, new mtime) is recognised by its SHA-256 once; the cache then records the new mtime."""
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    emb = weights.empty_prompt_embedding(ckpt_copy)
    p = ckpt_copy / TE_W
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 3_000_000_000))
    hashed = []
    real = weights.prompt._sha256
    monkeypatch.setattr(weights.prompt, "_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    for _ in range(3):
        torch.testing.assert_close(weights.empty_prompt_embedding(ckpt_copy), emb, atol=0, rtol=0)
    assert hashed.count(Path(TE_W).name) == 1, hashed


def test_download_that_left_a_partial_folder(ckpt_copy: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An offline hub client may return the partial folder it has without an error: the user is told the
    download is incomplete, not sent back to the command they just ran. RAFT in torch hub's folder counts."""
    import huggingface_hub

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    shutil.move(str(ckpt_copy / "raft" / RAFT_FILENAME), str(hub / "checkpoints" / RAFT_FILENAME))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: kw["local_dir"])

    def no_network(*a, **k):
        raise AssertionError("RAFT fetched although torch hub's folder has it")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert weights.download(ckpt_copy) == ckpt_copy.resolve()  # complete: nothing fetched
    (ckpt_copy / UNET_W).unlink()
    with pytest.raises(ModelFilesError) as info:
        weights.download(ckpt_copy)
    msg = str(info.value)
    assert "incomplete or damaged" in msg and UNET_W in msg and "run the download again" in msg
    assert "fix: run" not in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------ issue 26

def test_model_dir_must_be_a_path(tmp_path: Path) -> None:
    for bad, kind in ((123, "int"), (b"/tmp", "bytes"), (1.5, "float"), (True, "bool")):
        with pytest.raises(TypeError, match=rf"^model_dir must be a path \(str or os\.PathLike\), got {kind}$"):
            weights.resolve_model_dir(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model_dir must be a path \(str or os\.PathLike\), got int"):
        weights.validate_model_dir(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_dir is an empty string"):
        weights.resolve_model_dir("")


def test_symlink_loop_is_a_model_files_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for call in (weights.resolve_model_dir, weights.validate_model_dir, weights.download):
        with pytest.raises(ModelFilesError) as info:
            call(loop)
        msg = str(info.value)
        assert str(loop) in msg and "symbolic link" in msg and "\n" not in msg, msg
    monkeypatch.setenv(weights.ENV_MODEL_DIR, str(loop))
    with pytest.raises(ModelFilesError, match=weights.ENV_MODEL_DIR):
        weights.validate_model_dir()


def test_validate_a_file_instead_of_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ModelFilesError, match="is not a folder"):
        weights.validate_model_dir(f)


# Absurd config values: each must be refused, naming file, key, value and range, before any model is built.
ABSURD = [
    ("unet/config.json", "layers_per_block", 3000, "1..8"),
    ("unet/config.json", "layers_per_block", [1, 1, 1, 3000], "1..8"),
    ("unet/config.json", "block_out_channels", [16] * 40, "1..6 entries"),
    ("unet/config.json", "block_out_channels", [16, 16, 32, 100_000], "1..4096"),
    ("unet/config.json", "attention_head_dim", 100_000, "1..512"),
    ("unet/config.json", "cross_attention_dim", 10**6, "1..8192"),
    ("unet/config.json", "transformer_layers_per_block", 500, "1..10"),
    ("unet/config.json", "transformer_layers_per_block", [1, 1, [1, 500], 1], "1..10"),
    ("unet/config.json", "norm_num_groups", 1.5, "an integer"),
    ("unet/config.json", "in_channels", True, "an integer"),
    ("unet/config.json", "down_block_types", ["DownBlock2D"] * 100, "1..6 entries"),
    ("controlnet/config.json", "layers_per_block", 3000, "1..8"),
    ("controlnet/config.json", "conditioning_embedding_out_channels", [16] * 40, "1..6 entries"),
    ("controlnet/config.json", "conditioning_channels", 10**6, "1..16"),
    ("vae/config.json", "num_decoder_blocks", [3, 3, 5000], "0..16"),
    ("vae/config.json", "decoder_block_out_channels", [10**5] * 3, "1..1024"),
    ("vae/config.json", "upsampling_scaling_factor", 1000, "1..8"),
    ("vae/config.json", "scaling_factor", float("inf"), "a finite number"),
    ("text_encoder/config.json", "num_hidden_layers", 10**5, "1..64"),
    ("text_encoder/config.json", "vocab_size", 10**9, "1..1000000"),
    ("text_encoder/config.json", "hidden_size", 10**6, "1..8192"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 3e8, "an integer in 1..10000"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 10**8, "1..10000"),
    ("scheduler/scheduler_config.json", "beta_end", 5.0, "0..1"),
    ("scheduler/scheduler_config.json", "trained_betas", [0.01] * 20000, "entries"),
]


@pytest.mark.parametrize(("rel", "key", "value", "allowed"), ABSURD,
                         ids=[f"{r.split('/')[0]}-{k}-{i}" for i, (r, k, _, _) in enumerate(ABSURD)])
def test_absurd_config_values_are_refused_before_building(ckpt_copy: Path, no_hub_raft: Path,
                                                          monkeypatch: pytest.MonkeyPatch, rel: str, key: str,
                                                          value: object, allowed: str) -> None:
    import diffusers

    (ckpt_copy / CACHE).unlink(missing_ok=True)  # so that the text encoder is checked too
    path = ckpt_copy / rel
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))  # inf is written as Infinity, which Python's json reads back

    def guard(config: dict) -> None:
        if config.get(key) == value:
            raise AssertionError(f"{rel} was given to a model class with {key}={_short(value)}")

    real_build = weights.shapes._meta_build

    def guarded_build(model_dir, rel_config, build, config):  # noqa: ANN001, ANN202
        if rel_config == rel:
            guard(config)
        return real_build(model_dir, rel_config, build, config)

    real_from_config = diffusers.DDIMScheduler.from_config.__func__

    def guarded_from_config(cls, config=None, **kw):  # noqa: ANN001, ANN202
        guard(dict(config))
        return real_from_config(cls, config, **kw)

    monkeypatch.setattr(weights.shapes, "_meta_build", guarded_build)
    monkeypatch.setattr(diffusers.DDIMScheduler, "from_config", classmethod(guarded_from_config))
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    msg = str(info.value)
    shown = repr(value)[:20]
    assert rel in msg and key in msg and allowed in msg, msg
    assert (shown in msg or "entries" in msg), msg
    assert "\n" not in msg


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _release_configs() -> dict[str, dict]:
    """The configs of the real release (Jamichsu/Stream-DiffVSR) as diffusers / transformers write them."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from vsstreamdiffvsr.testing import SCHEDULER_CONFIG, TINY_VAE

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            only_cross_attention=(True, True, True, False), attention_head_dim=8, cross_attention_dim=1024,
            use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, num_class_embeds=None, norm_num_groups=32)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(64, 128, 256))
    vae = {**TINY_VAE, "block_out_channels": [64] * 3, "encoder_block_out_channels": [64] * 3,
           "decoder_block_out_channels": [64] * 3}
    text = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                          projection_dim=512).to_dict()
    as_json = lambda c: json.loads(json.dumps(dict(c), default=list))  # noqa: E731  (tuples become lists)
    return {"unet/config.json": as_json(unet.config), "controlnet/config.json": as_json(controlnet.config),
            "vae/config.json": vae, "text_encoder/config.json": as_json(text),
            "scheduler/scheduler_config.json": dict(SCHEDULER_CONFIG)}


def test_release_and_tiny_configs_are_within_the_ranges(tiny_ckpt: Path) -> None:
    for rel, config in _release_configs().items():
        assert weights._range_problems(rel, config) == [], rel
        assert weights._range_problems(rel, json.loads((tiny_ckpt / rel).read_text())) == [], rel


def _damage_many(root: Path) -> list[str]:
    (root / UNET_W).unlink()
    p = root / VAE_W
    p.write_bytes(p.read_bytes()[:-7])
    (root / "controlnet/config.json").write_text("{ nope")
    _edit_json(root / "scheduler/scheduler_config.json", num_train_timesteps=3e8)
    shutil.rmtree(root / "raft")
    return [UNET_W, VAE_W, "controlnet/config.json", "scheduler/scheduler_config.json", RAFT_FILENAME]


def test_validate_lists_every_problem(ckpt_copy: Path, no_hub_raft: Path) -> None:
    names = _damage_many(ckpt_copy)
    p = ckpt_copy / CN_W  # a second problem in the same component: its weights too
    p.write_bytes(p.read_bytes()[:50])
    names.append(CN_W)
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    msg = _assert_clear(info.value, *names)
    assert f"has {len(names)} problems" in msg
    assert len(info.value.problems) == len(names)
    for name in names:
        assert sum(name in p for p in info.value.problems) >= 1, (name, info.value.problems)
    assert "\n" not in info.value.summary and str(ckpt_copy.resolve()) in info.value.summary


def test_loader_still_fails_on_its_component(ckpt_copy: Path) -> None:
    (ckpt_copy / "vae/config.json").write_text("{ nope")
    with pytest.raises(ModelFilesError) as info:
        weights.load_vae(ckpt_copy)
    _assert_clear(info.value, "vae/config.json")


def test_config_file_that_is_too_large(ckpt_copy: Path, no_hub_raft: Path) -> None:
    data = json.loads((ckpt_copy / "unet/config.json").read_text())
    data["_padding"] = "x" * (2 << 20)
    (ckpt_copy / "unet/config.json").write_text(json.dumps(data))
    (ckpt_copy / "vae/config.json").write_text("[" * 100_000)  # deep nesting: a RecursionError inside json
    with pytest.raises(ModelFilesError) as info:
        weights.validate_model_dir(ckpt_copy)
    _assert_clear(info.value, "unet/config.json", "larger than", "vae/config.json")


def _poison_cache(root: Path, value: float) -> None:
    with safe_open(str(root / CACHE), framework="pt") as f:
        meta = f.metadata()
        emb = f.get_tensor("prompt_embeds")
    emb[0, 3, 5] = value
    save_file({"prompt_embeds": emb}, str(root / CACHE), metadata=meta)
    st = (root / TE_W).stat()  # keep the fingerprint valid: only the values are wrong
    os.utime(root / TE_W, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_prompt_cache_is_recomputed(ckpt_copy: Path, no_hub_raft: Path, value: float) -> None:
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    good = weights.empty_prompt_embedding(ckpt_copy)
    _poison_cache(ckpt_copy, value)
    assert weights._cached_prompt(ckpt_copy) is None
    again = weights.empty_prompt_embedding(ckpt_copy)
    assert bool(torch.isfinite(again).all())
    torch.testing.assert_close(again, good, atol=0, rtol=0)
    assert bool(torch.isfinite(load_file(str(ckpt_copy / CACHE))["prompt_embeds"]).all())  # rewritten
    weights.validate_model_dir(ckpt_copy)


def test_nonfinite_prompt_cache_without_text_encoder(ckpt_copy: Path, no_hub_raft: Path) -> None:
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    weights.empty_prompt_embedding(ckpt_copy)
    _poison_cache(ckpt_copy, float("nan"))
    shutil.rmtree(ckpt_copy / "text_encoder")
    for call in (weights.empty_prompt_embedding, weights.validate_model_dir):
        with pytest.raises(ModelFilesError) as info:
            call(ckpt_copy)
        _assert_clear(info.value, CACHE, "NaN", "text_encoder")


def test_text_encoder_that_gives_nan(ckpt_copy: Path) -> None:
    (ckpt_copy / CACHE).unlink(missing_ok=True)
    p = ckpt_copy / TE_W
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(p))
    key = next(k for k in state if k.endswith("final_layer_norm.weight"))
    state[key][0] = float("nan")
    save_file(state, str(p), metadata=meta)
    with pytest.raises(ModelFilesError) as info:
        weights.empty_prompt_embedding(ckpt_copy)
    _assert_clear(info.value, TE_W, "NaN")
    assert not (ckpt_copy / CACHE).exists()


# A failed download leaves no folder it created, and keeps what was there before.

def _offline_hub(monkeypatch: pytest.MonkeyPatch, action: Callable[[Path], None]) -> None:
    import huggingface_hub

    def fake(**kw):  # noqa: ANN003, ANN202
        action(Path(kw["local_dir"]))
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)


def _partial_bookkeeping(root: Path) -> None:
    d = root / ".cache" / "huggingface" / "download" / "unet"
    d.mkdir(parents=True)
    (d / "diffusion_pytorch_model.safetensors.incomplete").write_bytes(b"\0" * 100)
    (root / ".cache" / "huggingface" / ".gitignore").write_text("*\n")


@pytest.mark.parametrize("action", [lambda root: None, _partial_bookkeeping], ids=["nothing", "bookkeeping"])
def test_failed_download_removes_the_folders_it_created(tmp_path: Path, no_hub_raft: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        action: Callable[[Path], None]) -> None:
    _offline_hub(monkeypatch, action)
    target = tmp_path / "a" / "b" / "models"
    with pytest.raises(ConnectionError):
        weights.download(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emptyhub"]


def test_failed_download_keeps_finished_files(tmp_path: Path, no_hub_raft: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def one_file(root: Path) -> None:
        (root / "model_index.json").write_text("{}")

    _offline_hub(monkeypatch, one_file)
    target = tmp_path / "models"
    with pytest.raises(ConnectionError, match="files fetched so far are kept"):
        weights.download(target)
    assert [p.name for p in target.iterdir()] == ["model_index.json"]


def test_failed_download_into_an_existing_folder(tmp_path: Path, no_hub_raft: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    target = tmp_path / "models"
    (target / "unet").mkdir(parents=True)
    (target / "unet" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: kw["local_dir"])

    def no_network(url, dst, **kw):  # noqa: ANN001, ANN003, ANN202
        Path(dst + ".partial").write_bytes(b"\0" * 10)  # torch hub's temporary file, removed by it
        Path(dst + ".partial").unlink()
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ConnectionError, match=RAFT_FILENAME):
        weights.download(target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["unet", "unet/config.json"]


def test_interrupted_download_cleans_up(tmp_path: Path, no_hub_raft: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def interrupted(**kw):  # noqa: ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(huggingface_hub, "snapshot_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        weights.download(tmp_path / "models")
    assert not (tmp_path / "models").exists()

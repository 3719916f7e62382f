"""The ComfyUI nodes: their functions in this process, then the node pack inside a real ComfyUI 0.8.0 server.

The server tests need the test bed ``shared/testbeds/comfyui-0.8.0.tar.gz`` beside the repository (they skip
with one line where it is absent). One server per module: unpacked to a temporary folder, this repository linked
into its custom_nodes/ as a clone would be (docs/comfyui.md), the tiny checkpoint copied to
models/stream_diffvsr/tiny, started with ``--cpu``. Frames come back losslessly through the pack's Save Frames
node (float32 safetensors) and are compared for equality with the pipeline run in this process.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import subprocess
import sys
import tomllib
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vsstreamdiffvsr import StreamDiffVSR, StreamState, frame_noise
from vsstreamdiffvsr.comfyui import WORKFLOWS
from vsstreamdiffvsr.comfyui.errors import NodeError
from vsstreamdiffvsr.comfyui.files import FRAMES_FORMAT, list_states, read_state, write_frames, write_state
from vsstreamdiffvsr.comfyui.frames import NodeState, state_image, upscale_batch
from vsstreamdiffvsr.comfyui.models import find_model, live_pipes, load_pipe, model_names

from . import comfyui_server as cs

H, W = 34, 37  # LR frame size: not multiples of 4, so padding and cropping are exercised
SEED = 7
FRAMES = 3


def lr_frames(n: int = FRAMES, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 frames: a moving pattern plus grain (what a PNG/TIFF in ComfyUI's input/ holds)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = 0.5 + 0.4 * np.sin((xx + 2 * i) / 5.0)[..., None] * np.cos((yy - i) / 7.0)[..., None]
        out.append(np.clip(base + rng.normal(0, 0.05, (h, w, 3)), 0, 1))
    return (np.stack(out) * 255).round().astype(np.uint8)


def as_image(frames: np.ndarray) -> torch.Tensor:
    """ComfyUI's IMAGE of uint8 frames: (B, H, W, 3) float32, value / 255 (as its LoadImage computes it)."""
    return torch.from_numpy(frames.astype(np.float32) / 255.0)


def reference(pipe: StreamDiffVSR, images: torch.Tensor, seed: int = SEED, first: int = 0,
              state: StreamState | None = None) -> tuple[torch.Tensor, StreamState]:
    """The pipeline's own loop: frame n gets frame_noise(seed, n, padded shape); (B, 4H, 4W, 3) out."""
    b, h, w, _ = images.shape
    shape = (1, pipe.latent_channels, h + -h % 4, w + -w % 4)
    state = state or StreamState()
    outs = []
    for i in range(b):
        hq, state = pipe.process_frame(images[i].permute(2, 0, 1)[None].contiguous(), state,
                                       noise=frame_noise(seed, first + i, shape))
        outs.append(hq[0].permute(1, 2, 0))
    return torch.stack(outs), state


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return as_image(lr_frames())


@pytest.fixture(scope="module")
def expected(pipe: StreamDiffVSR, frames: torch.Tensor) -> torch.Tensor:
    return reference(pipe, frames)[0]


# ------------------------------------------------------------------------------------ without ComfyUI

def test_importing_the_package_imports_nothing_of_comfyui() -> None:
    code = f"""
import importlib.util, sys
import vsstreamdiffvsr, vsstreamdiffvsr.comfyui
import vsstreamdiffvsr.comfyui.frames, vsstreamdiffvsr.comfyui.files, vsstreamdiffvsr.comfyui.models
spec = importlib.util.spec_from_file_location("pack", {str(cs.REPO / "__init__.py")!r})
pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)
assert pack.NODE_CLASS_MAPPINGS == {{}}, pack.NODE_CLASS_MAPPINGS
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "comfy_api", "nodes"))
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_batch_equals_pipeline_and_vapoursynth_filter(pipe: StreamDiffVSR, tiny_ckpt: Path, frames: torch.Tensor,
                                                     expected: torch.Tensor) -> None:
    import vapoursynth as vs

    from vsstreamdiffvsr import upscale

    progress: list[tuple[int, int]] = []
    out, state = upscale_batch(pipe, frames, None, SEED, device="cpu", progress=lambda d, t: progress.append((d, t)))
    assert out.shape == (FRAMES, 4 * H, 4 * W, 3) and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert progress == [(i, FRAMES) for i in range(1, FRAMES + 1)]
    assert state.next_frame == FRAMES and state.size == (H, W)
    assert torch.equal(state_image(state), expected[-1:])

    core = vs.core
    planes = frames.permute(0, 3, 1, 2).numpy()
    blank = core.std.BlankClip(format=vs.RGBS, width=W, height=H, length=FRAMES)

    def fill(n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        f = f.copy()
        for p in range(3):
            np.copyto(np.asarray(f[p]), planes[n, p])
        return f

    clip = upscale(blank.std.ModifyFrame(blank, fill), model_dir=tiny_ckpt, device="cpu", dtype="float32", seed=SEED)
    got = torch.stack([torch.from_numpy(np.stack([np.asarray(clip.get_frame(n)[p]) for p in range(3)], -1))
                       for n in range(FRAMES)])
    assert torch.equal(got, expected)


def test_chained_batches_single_frames_and_first_frame(pipe: StreamDiffVSR, frames: torch.Tensor,
                                                      expected: torch.Tensor) -> None:
    a, state_a = upscale_batch(pipe, frames[:1], None, SEED, device="cpu")
    b, state_b = upscale_batch(pipe, frames[1:2], state_a, SEED, device="cpu")
    c, state_c = upscale_batch(pipe, frames[2:], state_b, SEED, device="cpu")
    assert torch.equal(torch.cat([a, b, c]), expected)
    assert [s.next_frame for s in (state_a, state_b, state_c)] == [1, 2, 3]
    # a cold start numbered 2 (Create State, first_frame=2): frame 2's noise, no history
    cold, _ = upscale_batch(pipe, frames[2:], NodeState(StreamState(frame_count=2)), SEED, device="cpu")
    assert torch.equal(cold, reference(pipe, frames[2:], first=2)[0])
    assert not torch.equal(cold, expected[2:])


def test_interrupt_between_frames_passes_through(pipe: StreamDiffVSR, frames: torch.Tensor) -> None:
    class Interrupted(Exception):
        pass

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        upscale_batch(pipe, frames, None, SEED, device="cpu", check_interrupt=check)
    assert len(calls) == 3  # checked before frames 0, 1 and 2: stopped before frame 2 ran


@pytest.mark.parametrize("images, message", [
    (torch.rand(2, 20, 40, 3), "at least 32x32 pixels"),
    (torch.rand(1, 40, 40, 4), "RGB (3 channels), got 4 channels; split the alpha off"),
    (torch.rand(40, 40, 3), "IMAGE batch of shape"),
    (torch.zeros(2, 40, 40, 3, dtype=torch.uint8), "float in [0, 1]"),
    (torch.full((2, 40, 40, 3), float("nan")), "frame 0 of the batch holds NaN"),
])
def test_bad_images_one_line(pipe: StreamDiffVSR, images: torch.Tensor, message: str) -> None:
    with pytest.raises(NodeError) as err:
        upscale_batch(pipe, images, None, SEED, device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_state_of_another_size_and_empty_state(pipe: StreamDiffVSR, frames: torch.Tensor) -> None:
    _, state = upscale_batch(pipe, frames[:1], None, SEED, device="cpu")
    with pytest.raises(NodeError, match=r"the state comes from 37x34 frames but these are 40x36"):
        upscale_batch(pipe, torch.rand(1, 36, 40, 3), state, SEED, device="cpu")
    loaded = NodeState(state.stream)  # as from a file: the padded size only
    with pytest.raises(NodeError, match=r"from 40x36 frames but these are 44x36"):
        upscale_batch(pipe, torch.rand(1, 36, 44, 3), loaded, SEED, device="cpu")
    with pytest.raises(NodeError, match="the state is empty"):
        state_image(NodeState(StreamState()))


def test_state_and_frame_files(pipe: StreamDiffVSR, frames: torch.Tensor, tmp_path: Path) -> None:
    out, state = upscale_batch(pipe, frames[:2], None, SEED, device="cpu")
    write_state(state, tmp_path / "sub" / "s_00001_.safetensors")
    (tmp_path / "sub" / "half.safetensors.partial").write_bytes(b"x")  # an unfinished write is never listed
    (tmp_path / "junk.safetensors").write_bytes(b"not a state")
    assert list_states(tmp_path) == ["junk.safetensors", "sub/s_00001_.safetensors"]
    back = read_state(tmp_path, "sub/s_00001_.safetensors")
    assert back.size is None and back.next_frame == 2
    rest, _ = upscale_batch(pipe, frames[2:], back, SEED, device="cpu")
    assert torch.equal(rest, upscale_batch(pipe, frames[2:], state, SEED, device="cpu")[0])
    for name, message in (("junk.safetensors", "junk.safetensors"), ("nope.safetensors", "not found"),
                          ("../x.safetensors", "inside")):
        with pytest.raises(NodeError, match=message):
            read_state(tmp_path, name)
    path = write_frames(out, tmp_path / "f.safetensors")
    assert torch.equal(load_file(path)["images"], out)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": FRAMES_FORMAT}


def test_model_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a / "m1", a / ".hidden", b / "m1", b / "m2"):
        folder.mkdir(parents=True)
    (a / "file.txt").write_text("")
    assert model_names([a, b, tmp_path / "missing"]) == ["m1", "m2"]
    assert find_model("m1", [a, b]) == (a / "m1").resolve()
    assert find_model("m2", [a, b]) == (b / "m2").resolve()
    with pytest.raises(NodeError, match=r"'m3' not found in .*; download it with `python -m vsstreamdiffvsr"):
        find_model("m3", [a, b])
    with pytest.raises(NodeError, match="not a folder name"):
        find_model("../m1", [a, b])


def test_loaded_pipe_is_shared_and_droppable(tiny_ckpt: Path, tmp_path: Path) -> None:
    before = live_pipes()
    one = load_pipe(tiny_ckpt, name="tiny", device=torch.device("cpu"), dtype="float32")
    two = load_pipe(tiny_ckpt, name="tiny", device=torch.device("cpu"), dtype="float32")
    assert one.pipe is two.pipe and live_pipes() == before + 1
    ref = weakref.ref(one.pipe)
    del one, two
    gc.collect()
    assert ref() is None and live_pipes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NodeError) as err:
        load_pipe(empty, name="empty", device=torch.device("cpu"))
    assert str(err.value).startswith("cannot load Stream-DiffVSR model 'empty': ") and "\n" not in str(err.value)
    assert "python -m vsstreamdiffvsr download" in str(err.value)


def test_requirements_txt_follows_pyproject() -> None:
    deps = tomllib.loads((cs.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [line.strip() for line in (cs.REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    name = re.compile(r"[A-Za-z0-9_.-]+")
    # ComfyUI's own, the filter's, and encode's (scene detection, progress bars)
    left_out = {"torch", "torchvision", "vapoursynth", "vapoursynth-bestsource", "scenedetect-headless", "tqdm"}
    assert sorted(reqs) == sorted(d for d in deps if name.match(d).group(0) not in left_out)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------ inside ComfyUI

def _ids(prompt: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in prompt.items()}


def _node(cls: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": cls, "inputs": inputs}


def _loader(model: str = "tiny") -> dict[str, Any]:
    return _node("StreamDiffVSR_Loader", model=model, device="cpu", dtype="float32", flow="hr", compile=False)


def _upscale(images: list[Any], seed: int = SEED, state: list[Any] | None = None, cls: str = "StreamDiffVSR_Upscale",
             image_key: str = "images", **tiling: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {"pipe": ["1", 0], image_key: images, "seed": seed, "tile": 0, "tile_overlap": 16,
                              "tile_denoise": False, **tiling}
    if state is not None:
        inputs["state"] = state
    return {"class_type": cls, "inputs": inputs}


def _saved_frames(server: cs.ComfyServer, entry: dict[str, Any], node: str) -> torch.Tensor:
    item = entry["outputs"][node]["frames"][0]
    path = server.root / "output" / item["subfolder"] / item["filename"]
    return load_file(path)["images"]


def _errors(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [data for event, data in entry["status"]["messages"] if event == "execution_error"]


_NO_TESTBED = None if cs.TESTBED.is_file() else f"ComfyUI test bed not found at {cs.TESTBED}"


@pytest.fixture
def comfy(request: pytest.FixtureRequest) -> cs.ComfyServer:
    """The module's server. Without the test bed, a skip that also marks the test: pytest's -ra summary folds
    marked skips of undecorated tests into one line for all the server tests."""
    if _NO_TESTBED:
        request.node.add_marker(pytest.mark.skip(reason=_NO_TESTBED))
        pytest.skip(_NO_TESTBED)
    return request.getfixturevalue("comfy_server")


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path):
    root = cs.unpack(tmp_path_factory.mktemp("comfyui"))
    (root / "custom_nodes" / "vsstreamdiffvsr").symlink_to(cs.REPO, target_is_directory=True)  # a clone, linked
    models = root / "models" / "stream_diffvsr"
    shutil.copytree(tiny_ckpt, models / "tiny")
    (models / "empty").mkdir()  # listed, but no model in it
    from PIL import Image

    def save_tiff(name: str, data: np.ndarray) -> None:
        pages = [Image.fromarray(f) for f in data]
        pages[0].save(root / "input" / name, save_all=True, append_images=pages[1:])

    save_tiff("frames.tif", lr_frames())
    save_tiff("long.tif", lr_frames(6, seed=1))
    save_tiff("small.tif", lr_frames(1, 24, 40))
    save_tiff("wide.tif", lr_frames(2, H, W + 8))
    server = cs.start(root, threads=torch.get_num_threads())
    try:
        yield server
    finally:
        server.stop()


def test_nodes_registered(comfy: cs.ComfyServer) -> None:
    info = comfy.get("/object_info")
    for name in ("Loader", "Upscale", "ProcessFrame", "CreateState", "ExtractState", "SaveState", "LoadState",
                 "SaveFrames"):
        assert f"StreamDiffVSR_{name}" in info, f"StreamDiffVSR_{name} not loaded; log:\n{comfy.log_tail()}"
    assert info["StreamDiffVSR_Loader"]["input"]["required"]["model"][0] == ["empty", "tiny"]
    ours = [line for line in comfy.log_text().splitlines() if line.rstrip().endswith("custom_nodes/vsstreamdiffvsr")]
    assert ours and not any("IMPORT FAILED" in line for line in ours), ours


def test_server_upscale_equals_pipeline(comfy: cs.ComfyServer, frames: torch.Tensor, expected: torch.Tensor) -> None:
    prompt = _ids({
        1: _loader(),
        2: _node("LoadImage", image="frames.tif"),
        3: _upscale(["2", 0]),
        4: _node("StreamDiffVSR_SaveFrames", images=["3", 0], filename_prefix="t/full"),
        5: _node("ImageFromBatch", image=["2", 0], batch_index=0, length=2),
        6: _node("ImageFromBatch", image=["2", 0], batch_index=2, length=1),
        7: _upscale(["5", 0]),
        8: _upscale(["6", 0], state=["7", 1]),
        9: _node("StreamDiffVSR_SaveFrames", images=["7", 0], filename_prefix="t/a"),
        10: _node("StreamDiffVSR_SaveFrames", images=["8", 0], filename_prefix="t/b"),
        11: _node("StreamDiffVSR_SaveState", state=["7", 1], filename_prefix="t/after2"),
        # frames 0 and 1 one at a time
        12: _node("StreamDiffVSR_CreateState", first_frame=0),
        14: _node("ImageFromBatch", image=["2", 0], batch_index=0, length=1),
        15: _node("ImageFromBatch", image=["2", 0], batch_index=1, length=1),
        16: _upscale(["14", 0], state=["12", 0], cls="StreamDiffVSR_ProcessFrame", image_key="image"),
        17: _upscale(["15", 0], state=["16", 1], cls="StreamDiffVSR_ProcessFrame", image_key="image"),
        18: _node("ImageBatch", image1=["16", 0], image2=["17", 0]),
        19: _node("StreamDiffVSR_SaveFrames", images=["18", 0], filename_prefix="t/single"),
        20: _node("StreamDiffVSR_ExtractState", state=["8", 1]),
        21: _node("StreamDiffVSR_SaveFrames", images=["20", 0], filename_prefix="t/last"),
        # frame 0 in 32 px tiles (a view of the loaded model with the tiling options)
        22: _upscale(["14", 0], tile=32),
        23: _node("StreamDiffVSR_SaveFrames", images=["22", 0], filename_prefix="t/tiled"),
    })
    entry, messages = comfy.run_watched(prompt, lambda m, s: None)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert torch.equal(_saved_frames(comfy, entry, "4"), expected)
    assert torch.equal(torch.cat([_saved_frames(comfy, entry, "9"), _saved_frames(comfy, entry, "10")]), expected)
    assert torch.equal(_saved_frames(comfy, entry, "19"), expected[:2])
    assert torch.equal(_saved_frames(comfy, entry, "21"), expected[-1:])
    tiled = _saved_frames(comfy, entry, "23")
    assert tiled.shape == expected[:1].shape and 0 <= float(tiled.min()) and float(tiled.max()) <= 1
    assert float((tiled - expected[:1]).abs().mean()) < 0.05  # tiles this small are close, not exact
    state_file = entry["outputs"]["11"]["states"][0]
    assert state_file["subfolder"] == "stream_diffvsr_states/t" and state_file["next_frame"] == 2
    # ComfyUI's progress bar moved once per frame on the 4-frame node
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "3"]
    assert [(p["value"], p["max"]) for p in progress] == [(i, FRAMES) for i in range(1, FRAMES + 1)]


def test_server_state_file_continues_the_stream(comfy: cs.ComfyServer, expected: torch.Tensor) -> None:
    prompt = _ids({
        1: _loader(),
        2: _node("LoadImage", image="frames.tif"),
        3: _node("ImageFromBatch", image=["2", 0], batch_index=2, length=1),
        4: _node("StreamDiffVSR_LoadState", state_file="t/after2_00001_.safetensors"),
        5: _upscale(["3", 0], state=["4", 0]),
        6: _node("StreamDiffVSR_SaveFrames", images=["5", 0], filename_prefix="t/resumed"),
    })
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert torch.equal(_saved_frames(comfy, entry, "6"), expected[2:])


def test_server_errors_are_one_line(comfy: cs.ComfyServer) -> None:
    load_state = _node("StreamDiffVSR_LoadState", state_file="t/after2_00001_.safetensors")
    cases = {  # case: (model, images, the node under test, extra nodes, failing node, message)
        "empty model folder": ("empty", "frames.tif", _upscale(["2", 0]), {}, "1",
                               "cannot load Stream-DiffVSR model 'empty': model folder "),
        "small frames": ("tiny", "small.tif", _upscale(["2", 0]), {}, "3", "images must be at least 32x32 pixels"),
        "state of another size": ("tiny", "wide.tif", _upscale(["2", 0], state=["4", 0]), {4: load_state}, "3",
                                  "the state comes from 40x36 frames but these are 45x34 (width x height)"),
        "tile_denoise without a tile": ("tiny", "frames.tif", _upscale(["2", 0], tile_denoise=True), {}, "3",
                                        "tile_denoise needs a tile size"),
        "batch into frame": ("tiny", "frames.tif",
                             _upscale(["2", 0], state=["4", 0], cls="StreamDiffVSR_ProcessFrame", image_key="image"),
                             {4: _node("StreamDiffVSR_CreateState", first_frame=0)}, "3",
                             "image must be one frame, got a batch of 3"),
    }
    for case, (model, images, node, extra, failing, message) in cases.items():
        prompt = _ids({1: _loader(model), 2: _node("LoadImage", image=images), 3: node,
                       5: _node("StreamDiffVSR_SaveFrames", images=["3", 0], filename_prefix="t/err"), **extra})
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "error", case
        (error,) = _errors(entry)
        assert error["node_id"] == failing and error["exception_type"].endswith("NodeError"), (case, error)
        text = error["exception_message"].strip()
        assert message in text and "\n" not in text, (case, text)


def test_server_unknown_model_is_refused_by_validation(comfy: cs.ComfyServer) -> None:
    prompt = _ids({1: _loader("nope"), 2: _node("LoadImage", image="frames.tif"), 3: _upscale(["2", 0]),
                   4: _node("StreamDiffVSR_SaveFrames", images=["3", 0], filename_prefix="t/x")})
    with pytest.raises(cs.PromptRejected) as err:
        comfy.queue(prompt)
    assert "nope" in json.dumps(err.value.body["node_errors"]["1"])


def test_server_interrupt_stops_between_frames(comfy: cs.ComfyServer) -> None:
    prompt = _ids({1: _loader(), 2: _node("LoadImage", image="long.tif"), 3: _upscale(["2", 0], seed=99),
                   4: _node("StreamDiffVSR_SaveFrames", images=["3", 0], filename_prefix="t/never")})
    sent = []

    def interrupt_on_first_frame(m: dict[str, Any], server: cs.ComfyServer) -> None:
        if m["type"] == "progress" and m["data"]["node"] == "3" and not sent:
            sent.append(server.request("POST", "/interrupt", {})[0])

    entry, messages = comfy.run_watched(prompt, interrupt_on_first_frame)
    assert sent == [200]
    interrupted = [d for e, d in entry["status"]["messages"] if e == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "StreamDiffVSR_Upscale", entry["status"]
    done = [m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "3"]
    assert max(done) < 6
    assert "4" not in entry["outputs"]


def _video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _video_size(path: Path) -> tuple[int, int, int]:
    import av

    with av.open(str(path)) as f:
        frames = [fr for fr in f.decode(video=0)]
        return len(frames), frames[0].width, frames[0].height


def _example(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / name).read_text())


def _without_meta(prompt: dict[str, Any]) -> dict[str, Any]:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def _set_inputs(prompt: dict[str, Any], cls: str, **values: Any) -> None:
    nodes = [n for n in prompt.values() if n["class_type"] == cls]
    assert len(nodes) == 1, f"{cls}: {len(nodes)} nodes"
    nodes[0]["inputs"].update(values)


def _video_output(server: cs.ComfyServer, entry: dict[str, Any]) -> Path:
    (item,) = [i for out in entry["outputs"].values() for i in out.get("images", []) if i.get("type") == "output"]
    return server.root / "output" / item["subfolder"] / item["filename"]


def test_example_workflows_run(comfy: cs.ComfyServer) -> None:
    _video(comfy.root / "input" / "clip.mp4", lr_frames(2, 32, 36, seed=2))
    _video(comfy.root / "input" / "more.mp4", lr_frames(1, 32, 36, seed=3))
    first = _example("upscale_video.api.json")
    _set_inputs(first, "StreamDiffVSR_Loader", model="tiny")  # device and dtype auto: the CPU, float32
    _set_inputs(first, "LoadVideo", file="clip.mp4")
    entry = comfy.run(first)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert _video_size(_video_output(comfy, entry)) == (2, 4 * 36, 4 * 32)
    (state,) = [o["states"][0] for o in entry["outputs"].values() if "states" in o]
    assert state["filename"] == "video_00001_.safetensors" and state["next_frame"] == 2

    second = _example("continue_video.api.json")  # loads the state the first one saved: the next frame
    _set_inputs(second, "StreamDiffVSR_Loader", model="tiny")
    _set_inputs(second, "LoadVideo", file="more.mp4")
    entry = comfy.run(second)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert _video_size(_video_output(comfy, entry)) == (1, 4 * 36, 4 * 32)
    (state,) = [o["states"][0] for o in entry["outputs"].values() if "states" in o]
    assert state["next_frame"] == 3


def test_example_ui_workflows_are_the_api_workflows(comfy: cs.ComfyServer) -> None:
    """The UI form, turned into a prompt as the frontend does with the server's node definitions, is exactly
    the API form (which test_example_workflows_run runs)."""
    info = comfy.get("/object_info")
    stems = sorted(p.name.removesuffix(".api.json") for p in WORKFLOWS.glob("*.api.json"))
    assert stems == ["continue_video", "upscale_video"]
    for stem in stems:
        assert cs.ui_to_api(_example(f"{stem}.json"), info) == _without_meta(_example(f"{stem}.api.json")), stem


def test_server_free_releases_the_model(comfy: cs.ComfyServer) -> None:
    assert "Stream-DiffVSR: loaded model 'tiny' on cpu" in comfy.log_text()
    released = comfy.log_text().count("Stream-DiffVSR: released model 'tiny'")
    status, _ = comfy.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    assert comfy.wait_for_log("Stream-DiffVSR: released model 'tiny'", released + 1, timeout=30), comfy.log_tail()

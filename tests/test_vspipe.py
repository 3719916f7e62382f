"""vspipe end to end: byte-identical output across request depths and thread counts, clean stdout,
and the README's main job (vspipe | ffmpeg) on a real file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import vapoursynth as vs
import vsstreamdiffvsr
from tests.vsclips import make_source
core = vs.core
core.num_threads = int(threads)
src = make_source(34, 32, int(length), cuts={{7}})
vsstreamdiffvsr.upscale(src, model_dir={model!r}, device="cpu", max_gap=int(globals().get("max_gap", 16))).set_output()
"""


def vspipe() -> str:
    exe = BIN / "vspipe"
    return str(exe) if exe.exists() else (shutil.which("vspipe") or "vspipe")


def run_vspipe(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([vspipe(), *args, str(script), "-"], capture_output=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def script(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vpy") / "filter.vpy"
    path.write_text(SCRIPT.format(repo=str(REPO), model=str(tiny_ckpt)))
    return path


def test_same_bytes_for_any_requests_and_threads(script: Path, pipe) -> None:
    length, h, w = 12, 32, 34
    outputs = {}
    for requests, threads in ((1, 1), (8, 2), (3, 4)):
        res = run_vspipe(script, "-r", str(requests), "-a", f"threads={threads}", "-a", f"length={length}")
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        outputs[(requests, threads)] = res.stdout
    first = outputs[(1, 1)]
    # stdout holds the raw frames and nothing else (RGBS: 3 planes of 4h x 4w float32)
    assert len(first) == length * 3 * (4 * h) * (4 * w) * 4
    for key, data in outputs.items():
        assert data == first, f"output differs for -r {key[0]} / {key[1]} threads"

    # and the bytes are the pipeline's: vspipe writes RGB planes in G, B, R order
    from .vsclips import expected_run, make_source

    src = make_source(w, h, length, cuts={7})
    expected = expected_run(pipe, src, range(7)) + expected_run(pipe, src, range(7, length))
    frame_bytes = 3 * 4 * h * 4 * w * 4
    for n in (0, 6, 7, 11):
        planes = np.frombuffer(first[n * frame_bytes:(n + 1) * frame_bytes], dtype=np.float32).reshape(3, 4 * h, 4 * w)
        rgb = torch.from_numpy(planes[[2, 0, 1]].copy())[None]
        assert float((rgb - expected[n]).abs().max()) <= 1e-6


def test_same_bytes_with_the_gap_limit_and_cache_eviction_in_play(script: Path) -> None:
    """max_gap=4 (a cache of 8) over 16 frames: requests run up against the gap and the cache evicts, and
    the bytes still do not depend on the request depth (up to max_gap) or the thread count."""
    outputs = {}
    for requests, threads in ((1, 1), (4, 4), (3, 2)):
        res = run_vspipe(script, "-r", str(requests), "-a", f"threads={threads}", "-a", "length=16",
                         "-a", "max_gap=4")
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        outputs[(requests, threads)] = res.stdout
    first = outputs[(1, 1)]
    assert len(first) == 16 * 3 * (4 * 32) * (4 * 34) * 4
    for key, data in outputs.items():
        assert data == first, f"output differs for -r {key[0]} / {key[1]} threads"


def test_seek_with_start_frame(script: Path, pipe) -> None:
    """vspipe -s N: a cold start somewhere in N..N+r, never a hang, and still the rules' frames."""
    res = run_vspipe(script, "-s", "9", "-r", "1", "-a", "threads=2", "-a", "length=12", "-a", "max_gap=2")
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    from .vsclips import expected_run, make_source

    src = make_source(34, 32, 12, cuts={7})
    expected = expected_run(pipe, src, range(9, 12))  # -r 1: the first request is frame 9, a seek
    frame_bytes = 3 * 128 * 136 * 4
    assert len(res.stdout) == 3 * frame_bytes
    for k in range(3):
        planes = np.frombuffer(res.stdout[k * frame_bytes:(k + 1) * frame_bytes], dtype=np.float32)
        rgb = torch.from_numpy(planes.reshape(3, 128, 136)[[2, 0, 1]].copy())[None]
        assert float((rgb - expected[k]).abs().max()) <= 1e-6


def test_main_job_vspipe_to_ffmpeg(tiny_ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=24", "-frames:v",
                    "6", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(src)], check=True, timeout=120)
    out = tmp_path / "out.mkv"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PWD": str(tmp_path)}
    # the README's line, with options passed by name
    cmd = (f"'{vspipe()}' -c y4m -a input=in.mkv -a model_dir='{tiny_ckpt}' -a device=cpu -a compile=0 "
           f"-a raft_corr=half -a tile=32 '{REPO / 'scripts' / 'upscale.vpy'}' - | ffmpeg -v error -y -i - "
           f"-c:v libx265 -pix_fmt yuv420p10le -crf 16 -colorspace bt709 -color_primaries bt709 -color_trc bt709 "
           f"-color_range tv '{out}'")
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, env=env, capture_output=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                            "stream=width,height,nb_read_frames,pix_fmt,color_space,color_primaries,color_transfer,"
                            "color_range", "-of", "csv=p=0", str(out)], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "256,192,yuv420p10le,tv,bt709,bt709,bt709,6"


def test_main_job_takes_an_rgb_source(tiny_ckpt: Path, tmp_path: Path) -> None:
    """An RGB file (_Matrix 0) comes out as BT.709 YUV, not a resize error on the matrix."""
    src = tmp_path / "in.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=24", "-frames:v",
                    "2", "-pix_fmt", "gbrp", "-c:v", "ffv1", str(src)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PWD": str(tmp_path)}
    res = subprocess.run([vspipe(), "-c", "y4m", "-a", "input=in.mkv", "-a", f"model_dir={tiny_ckpt}", "-a",
                          "device=cpu", str(REPO / "scripts" / "upscale.vpy"), str(tmp_path / "out.y4m")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    header = (tmp_path / "out.y4m").read_bytes()[:80].split(b"\n")[0].decode()
    assert {"YUV4MPEG2", "W256", "H192", "C420p10", "XLENGTH=2"} <= set(header.split()), header


# one per kind of check in upscale.vpy (an Options field, an unknown name, its own fps); every Options value is
# checked in-process by tests/test_options.py::test_from_strings_reads_vspipe_arguments_by_field_type
@pytest.mark.parametrize(("arg", "needle"), [("compile=maybe", "compile must be 0 or 1"),
                                             ("tiles=32", "unknown argument 'tiles'"),
                                             ("fps=fast", "fps must be a rate")])
def test_main_job_rejects_bad_arguments(tiny_ckpt: Path, tmp_path: Path, arg: str, needle: str) -> None:
    src = tmp_path / "in.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=24", "-frames:v",
                    "2", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(src)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PWD": str(tmp_path)}
    res = subprocess.run([vspipe(), "--info", "-a", "input=in.mkv", "-a", f"model_dir={tiny_ckpt}", "-a", "device=cpu",
                          "-a", arg, str(REPO / "scripts" / "upscale.vpy")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert needle in res.stderr, res.stderr[-2000:]

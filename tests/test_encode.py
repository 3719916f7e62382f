"""``vsstreamdiffvsr encode`` end to end on the CPU with the tiny checkpoint: a three-scene 32x32 clip with audio,
subtitles and chapters (made with ffmpeg's own sources) encoded losslessly (ffv1) and compared frame for frame
with vspipe over the same cuts; the default HEVC output's streams and tags; a driver killed mid-part resumes to
identical frames without computing a finished part again; a NaN source frame; every bad input, one line each.

Every run uses one torch thread (``--cpu-threads 1``, vspipe with OMP_NUM_THREADS=1): torch's CPU kernels split
sums by thread, so CPU frames are bit-identical only between runs with the same threads per worker.
About 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vsstreamdiffvsr.encode.command import main

#: three scenes of 8, 6 and 9 frames at 24 fps, 32x32: cuts at 8 and 14
SCENES = "testsrc2=size=32x32:rate=24:d=0.3[a];smptebars=size=32x32:rate=24:d=0.25[b];" \
         "rgbtestsrc=size=32x32:rate=24:d=0.35,hue=H=t*2[c];[a][b][c]concat=n=3:v=1:a=0[v]"
FRAMES = 23
CUTS = [8, 14]

_SRT = "1\n00:00:00,000 --> 00:00:00,400\nhello\n\n2\n00:00:00,500 --> 00:00:00,900\nworld\n"
_META = (";FFMETADATA1\ntitle=Encode test\n[CHAPTER]\nTIMEBASE=1/1000\nSTART=0\nEND=500\ntitle=One\n"
         "[CHAPTER]\nTIMEBASE=1/1000\nSTART=500\nEND=950\ntitle=Two\n")


def ffmpeg(*args: str, timeout: int = 120) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, timeout=timeout, stdin=subprocess.DEVNULL)


def make_film(folder: Path) -> Path:
    """The three-scene clip with a sine audio track, an SRT subtitle stream, two chapters and a title."""
    srt, meta, out = folder / "subs.srt", folder / "meta.txt", folder / "film.mkv"
    srt.write_text(_SRT)
    meta.write_text(_META)
    ffmpeg("-i", str(srt), "-f", "ffmetadata", "-i", str(meta), "-filter_complex",
           f"{SCENES};sine=frequency=440:duration=1[s]", "-map", "[v]", "-map", "[s]", "-map", "0:s",
           "-map_metadata", "1", "-map_chapters", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
           "-c:s", "srt", str(out))
    return out


def make_single_scene(folder: Path, frames: int = 6) -> Path:
    out = folder / "single.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=24", "-frames:v", str(frames), "-c:v", "libx264",
           "-pix_fmt", "yuv420p", str(out))
    return out


def decoded(path: Path) -> bytes:
    """Every frame of ``path``'s video as raw 10-bit 4:2:0, in stream order (no frame rate conversion)."""
    res = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough",
                          "-f", "rawvideo", "-pix_fmt", "yuv420p10le", "-"], capture_output=True, check=True,
                         timeout=120)
    return res.stdout


def probe(path: Path) -> dict[str, Any]:
    res = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-show_chapters", "-count_frames",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(res.stdout)


def frame_bytes(width: int, height: int) -> int:
    return width * height * 3  # 10-bit 4:2:0

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT_W, OUT_H = 128, 128


def _ffv1(tiny_ckpt: Path, *extra: str) -> list[str]:
    return ["--model-dir", str(tiny_ckpt), "--device", "cpu", "--cpu-threads", "1", "--min-scene-len", "3",
            "--part-frames", "5", "--encoder-args", "-c:v ffv1", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def _log_counts(log: Path) -> tuple[Counter, Counter]:
    starts, dones = Counter(), Counter()
    for line in log.read_text().splitlines():
        what, chunk, part, _pid = line.split()
        (starts if what == "start" else dones)[(int(chunk), int(part))] += 1
    return starts, dones


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    make_film(folder)
    make_single_scene(folder)
    return folder


@pytest.fixture(scope="module")
def reference(media: Path, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One uninterrupted lossless encode (one worker, in this process), its frames and its kept plan."""
    out = tmp_path_factory.mktemp("ref") / "film-4x.mkv"
    code = main([str(media / "film.mkv"), str(out), *_ffv1(tiny_ckpt, "--keep-work")])
    assert code == 0
    return {"output": out, "frames": decoded(out), "work": Path(str(out) + ".work")}


def test_encode_finds_the_cuts_keeps_the_streams_and_equals_vspipe(media: Path, reference: dict, tiny_ckpt: Path,
                                                                 tmp_path: Path) -> None:
    out, frames, work = reference["output"], reference["frames"], reference["work"]
    assert (work / "cuts.txt").read_text().split() == [str(c) for c in CUTS]
    assert len(frames) == FRAMES * frame_bytes(OUT_W, OUT_H)
    info = probe(out)
    kinds = Counter(s["codec_type"] for s in info["streams"])
    assert kinds == {"video": 1, "audio": 1, "subtitle": 1}
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert (video["codec_name"], video["width"], video["height"], video["pix_fmt"]) == ("ffv1", 128, 128,
                                                                                        "yuv420p10le")
    assert video["r_frame_rate"] == "24/1" and int(video["nb_read_frames"]) == FRAMES
    assert video["color_space"] == "bt709" and video["color_range"] == "tv"
    assert [c["tags"]["title"] for c in info["chapters"]] == ["One", "Two"]
    assert info["format"]["tags"]["title"] == "Encode test"

    # vspipe over the same cuts, converted as scripts/upscale.vpy converts: the same bytes
    script = tmp_path / "same_cuts.vpy"
    script.write_text(
        "import vapoursynth as vs\nimport vsstreamdiffvsr\nfrom vsstreamdiffvsr.encode import mark_scene_cuts\n"
        f"core = vs.core\nclip = core.bs.VideoSource(source={str(media / 'film.mkv')!r})\n"
        "matrix = int(clip.get_frame(0).props.get('_Matrix', 2))\nmatrix = 1 if matrix in (0, 2, 3) else matrix\n"
        "rgb = core.resize.Bicubic(clip, format=vs.RGBS, matrix_in=matrix)\n"
        f"rgb = mark_scene_cuts(rgb, {str(work)!r})\n"
        f"up = vsstreamdiffvsr.upscale(rgb, model_dir={str(tiny_ckpt)!r}, device='cpu', compile=False)\n"
        "core.resize.Bicubic(up, format=vs.YUV420P10, matrix=matrix).set_output()\n")
    res = subprocess.run([str(BIN / "vspipe"), str(script), "-"], capture_output=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert res.stdout == frames


def test_single_scene_equals_scripts_upscale_vpy(media: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    """With no cut, encode decodes and converts exactly as scripts/upscale.vpy: the same bytes out."""
    out = tmp_path / "single-4x.mkv"
    assert main([str(media / "single.mkv"), str(out), *_ffv1(tiny_ckpt)]) == 0
    res = subprocess.run([str(BIN / "vspipe"), "-a", f"input={media / 'single.mkv'}", "-a", f"model_dir={tiny_ckpt}",
                          "-a", "device=cpu", "-a", "compile=0", str(REPO / "scripts" / "upscale.vpy"), "-"],
                         capture_output=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert res.stdout == decoded(out)
    assert not Path(str(out) + ".work").exists()  # the work folder goes once the output is complete


def test_default_encoder_is_10bit_hevc_with_audio_and_subtitles(media: Path, tiny_ckpt: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "film-4x.mp4"
    code = main([str(media / "film.mkv"), str(out), "--model-dir", str(tiny_ckpt), "--device", "cpu",
                 "--min-scene-len", "3", "--max-chunk", "6", "--warmup", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == ""  # stdout carries nothing but what was asked for
    assert "frames" in captured.err and "wrote" in captured.err
    info = probe(out)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert (video["codec_name"], video["pix_fmt"], video["profile"]) == ("hevc", "yuv420p10le", "Main 10")
    assert int(video["nb_read_frames"]) == FRAMES and video["color_space"] == "bt709"
    audio = next(s for s in info["streams"] if s["codec_type"] == "audio")
    assert audio["codec_name"] == "aac" and int(audio["nb_read_frames"]) > 0
    subs = next(s for s in info["streams"] if s["codec_type"] == "subtitle")
    assert subs["codec_name"] == "mov_text"  # SRT turned into the text subtitles MP4 holds
    assert [p.name for p in tmp_path.iterdir()] == ["film-4x.mp4"]  # no temporary file, no work folder left


def test_dry_run_prints_the_plan_and_a_changed_setting_is_refused(media: Path, tiny_ckpt: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.mkv"
    common = [str(media / "film.mkv"), str(out), "--model-dir", str(tiny_ckpt), "--device", "cpu",
              "--min-scene-len", "3", "--max-chunk", "6", "--warmup", "2", "--part-frames", "4", "--dry-run"]
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert "23 frames at 24/1 fps" in printed and "3 scenes" in printed and "estimate:" in printed
    rows = [line.split("\t") for line in printed.splitlines() if line[:1].isdigit()]
    # scenes 0-7, 8-13, 14-22: the 8- and 9-frame scenes split into pieces of 4+4 and 5+4 (warm-up 2 before each
    # later piece); the 6-frame scene is a chunk of two parts
    assert [(r[1], r[2], r[5]) for r in rows] == [("0", "3", "0"), ("4", "7", "2"), ("8", "13", "0"),
                                                  ("14", "18", "0"), ("19", "22", "2")]
    assert not out.exists()
    code = main([*common, "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 3
    assert "seed 0 -> 1" in err and "another --work-dir" in err and len(err.strip().splitlines()) == 1


def test_killed_driver_resumes_to_identical_frames(media: Path, reference: dict, tiny_ckpt: Path,
                                                   tmp_path: Path) -> None:
    """SIGKILL of the driver (--workers 1: the worker is the driver) in the middle of chunk 1's second part:
    the rerun computes only that part again, and the frames equal the uninterrupted run's."""
    out, log, marker = tmp_path / "film-4x.mkv", tmp_path / "parts.log", tmp_path / "killed"
    env = {**_env(), "VSSTREAMDIFFVSR_TEST_LOG": str(log), "VSSTREAMDIFFVSR_TEST_KILL_AT": f"12:{marker}"}
    cmd = [sys.executable, "-m", "vsstreamdiffvsr", "encode", str(media / "film.mkv"), str(out),
           *_ffv1(tiny_ckpt)]
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert res.returncode == -9, res.stderr.decode()[-2000:]
    assert marker.exists() and not out.exists()
    assert not list(tmp_path.glob(".film-4x*"))  # no half-written output under any name
    started_before, done_before = _log_counts(log)
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    starts, dones = _log_counts(log)
    again = {k for k, n in starts.items() if n > 1}
    assert again == {(1, 1)}  # chunk 1 = frames 8-13, parts 8-10 and 11-13: only the killed part ran twice
    assert all(starts[k] == 1 for k in done_before if k not in again)
    assert sum(dones.values()) == len(dones) == 6
    assert decoded(out) == reference["frames"]


def test_nan_source_frame_stops_with_the_frame_named(media: Path, tiny_ckpt: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "nan.vpy"
    script.write_text(
        "import numpy as np\nimport vapoursynth as vs\ncore = vs.core\n"
        f"clip = core.bs.VideoSource(source={str(media / 'film.mkv')!r})\n"
        "rgb = core.resize.Bicubic(clip, format=vs.RGBS, matrix_in=1)\n"
        "def poison(n, f):\n    if n != 20:\n        return f\n    out = f.copy()\n"
        "    np.asarray(out[1])[5, 6] = float('nan')\n    return out\n"
        "rgb.std.ModifyFrame(rgb, poison).set_output()\n")
    out = tmp_path / "nan-4x.mkv"
    code = main([str(script), str(out), *_ffv1(tiny_ckpt), "--streams-from", str(media / "film.mkv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert "source frame 20 contains NaN" in err[-1]
    assert not out.exists()
    finished = sorted(p.name for p in Path(str(out) + ".work").glob("parts/*.json"))
    # chunk 2 (frames 14-22, the longest, first) fails in its second part (19-22); its first part is kept
    assert "c000002-p0000.json" in finished


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", str(folder / "audio.mka"))
    ffmpeg("-filter_complex", "testsrc2=size=32x32:rate=24:d=1[a];testsrc2=size=32x32:rate=12:d=1[b];"
           "[a][b]concat=n=2:v=1:a=0", "-fps_mode", "passthrough", "-c:v", "libx264", str(folder / "vfr.mkv"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=24", "-frames:v", "4", "-vf", "setfield=tff", "-flags",
           "+ildct+ilme", "-c:v", "libx264", "-x264-params", "interlaced=1", str(folder / "interlaced.mkv"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=24", "-f", "lavfi", "-i", "sine=duration=0.3", "-frames:v",
           "4", "-c:v", "libx264", "-c:a", "pcm_s16le", str(folder / "pcm.mkv"))
    (folder / "garbage.mkv").write_bytes(b"this is not a video\n" * 50)
    (folder / "a-file").write_text("x")
    (folder / "exists.mkv").write_bytes(b"")
    return folder


@pytest.mark.parametrize(("name", "output", "extra", "needle"), [
    ("missing.mkv", "o.mkv", [], "does not exist"),
    ("garbage.mkv", "o.mkv", [], "cannot read"),
    ("audio.mka", "o.mkv", [], "has no video stream"),
    ("vfr.mkv", "o.mkv", [], "variable frame rate"),
    ("interlaced.mkv", "o.mkv", [], "is interlaced"),
    ("film", "a-file/o.mkv", [], "is not a folder"),
    ("film", "no-such-folder/o.mkv", [], "does not exist; create it"),
    ("film", "exists.mkv", [], "exists; pass --overwrite"),
    ("film", "o.mkv", ["--encoder-args", "-c:v nosuchcodec"], "Unknown encoder 'nosuchcodec'"),
    ("pcm.mkv", "o.mp4", [], "Could not find tag for codec pcm_s16le"),  # a source stream MP4 cannot hold
    ("film", "o.mkv", ["--device", "cpu", "--model-dir", "/nonexistent/model"], "download"),
])
def test_bad_input_is_one_line_and_an_exit_code(bad_media: Path, media: Path, tiny_ckpt: Path, name: str,
                                                output: str, extra: list[str], needle: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    source = media / "film.mkv" if name == "film" else bad_media / name
    args = [str(source), str(bad_media / output), "--device", "cpu", "--model-dir", str(tiny_ckpt), *extra]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("vsstreamdiffvsr encode: ") and needle in err[0], err
    assert "Traceback" not in err[0]


def test_a_variable_frame_rate_converts_with_fps(bad_media: Path, tiny_ckpt: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(bad_media / "vfr.mkv"), str(tmp_path / "o.mkv"), "--device", "cpu", "--model-dir",
                 str(tiny_ckpt), "--fps", "24", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "at 24/1 fps" in out and "36 frames" not in out  # 1 s at 24 + 1 s at 12, made 24 fps


def test_ffmpeg_missing(media: Path, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code = main([str(media / "film.mkv"), str(tmp_path / "o.mkv"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("vsstreamdiffvsr encode: ffmpeg not found on PATH; install ffmpeg (Debian/Ubuntu: "
                                 "apt-get install ffmpeg)")


def test_disk_full_keeps_finished_parts(media: Path, tiny_ckpt: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A work folder on a 448 KiB tmpfs: the first states fit, a later write does not; one line, exit code 4."""
    work = tmp_path / "small"
    work.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=448k", "tmpfs", str(work)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        code = main([str(media / "film.mkv"), str(tmp_path / "o.mkv"), *_ffv1(tiny_ckpt), "--work-dir",
                     str(work / "w")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 4, err
        assert "no space left" in err[-1] and "rerun the same command" in err[-1]
        assert list((work / "w" / "parts").glob("*.json"))  # what finished is kept
        assert not (tmp_path / "o.mkv").exists()
    finally:
        subprocess.run(["umount", str(work)], check=True)

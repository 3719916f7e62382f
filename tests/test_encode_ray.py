"""``vsstreamdiffvsr encode --workers 2`` on a local Ray (one cluster for the module, two CPU workers of one
torch thread each): the same frames as one in-process worker; a worker killed in the middle of a part has its
chunk finished elsewhere from its last saved part, recomputing only that part; a NaN source frame read by the
reader actor stops the encode with the frame named. About 1.5 minutes on 2 cores."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vsstreamdiffvsr.encode.command import main

from .test_encode import FRAMES, _ffv1, _log_counts, decoded, frame_bytes, make_film


@pytest.fixture(scope="module")
def ray_session():
    import ray  # in the test extra: CI runs the cluster path

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, object_store_memory=128 << 20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def film(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_film(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def one_worker(film: Path, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("one") / "film-4x.mkv"
    assert main([str(film), str(out), *_ffv1(tiny_ckpt)]) == 0
    return decoded(out)


def test_two_workers_give_the_frames_of_one(ray_session, film: Path, one_worker: bytes, tiny_ckpt: Path,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "film-4x.mkv"
    assert main([str(film), str(out), *_ffv1(tiny_ckpt, "--workers", "2")]) == 0
    err = capsys.readouterr().err
    assert "workers:" in err and err.count(" fps (") >= 2  # both workers reported on the progress line
    frames = decoded(out)
    assert len(frames) == FRAMES * frame_bytes(128, 128)
    assert frames == one_worker


def test_killed_worker_resumes_elsewhere_from_its_last_part(ray_session, film: Path, one_worker: bytes,
                                                           tiny_ckpt: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Frame 12 is in chunk 1's second part (frames 11-13): the worker computing it is SIGKILLed there once;
    Ray restarts it, and the part is computed again (with the state saved after frames 8-10), nothing else."""
    log, marker, out = tmp_path / "parts.log", tmp_path / "killed", tmp_path / "film-4x.mkv"
    monkeypatch.setenv("VSSTREAMDIFFVSR_TEST_LOG", str(log))
    monkeypatch.setenv("VSSTREAMDIFFVSR_TEST_KILL_AT", f"12:{marker}")
    assert main([str(film), str(out), *_ffv1(tiny_ckpt, "--workers", "2")]) == 0
    assert marker.exists()
    starts, dones = _log_counts(log)
    assert {k for k, n in starts.items() if n > 1} == {(1, 1)}
    assert all(n == 1 for k, n in starts.items() if k != (1, 1))
    assert sorted(dones) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] and set(dones.values()) == {1}
    assert decoded(out) == one_worker


def test_nan_source_frame_on_a_worker_stops_the_encode(ray_session, film: Path, tiny_ckpt: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "nan.vpy"
    script.write_text(
        "import numpy as np\nimport vapoursynth as vs\ncore = vs.core\n"
        f"clip = core.bs.VideoSource(source={str(film)!r})\n"
        "rgb = core.resize.Bicubic(clip, format=vs.RGBS, matrix_in=1)\n"
        "def poison(n, f):\n    if n != 3:\n        return f\n    out = f.copy()\n"
        "    np.asarray(out[2])[1, 1] = float('inf')\n    return out\n"
        "rgb.std.ModifyFrame(rgb, poison).set_output()\n")
    out = tmp_path / "nan-4x.mkv"
    code = main([str(script), str(out), *_ffv1(tiny_ckpt, "--workers", "2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == ("vsstreamdiffvsr encode: source frame 3 contains NaN or infinite values; fix the source "
                       "(e.g. replace them with std.Expr in a .vpy) before upscaling")
    assert not out.exists()

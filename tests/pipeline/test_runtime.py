"""Where frames run: the model's lock, the one worker thread per device of CUDA-graph pipelines (and the graph
trees' thread-local state it prepares), and the process-wide cuDNN/TF32 flags, set while a frame runs and
restored after.

A CUDA-graph pipeline is asked for as the user does (compile=True, reduce-overhead); only cold frames run here,
which compile nothing (the compiled paths are tested in test_compiling.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vsstreamdiffvsr import StreamDiffVSR, StreamState
from vsstreamdiffvsr.options import Options
from vsstreamdiffvsr.pipeline import compiling
from vsstreamdiffvsr.pipeline.runtime import Worker, run_flags

from ..streams import frames_and_noise


@pytest.fixture
def graphs_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, object]]:
    """The options of a CUDA-graph pipeline on the CPU (aot_eager, a kernel-cache folder of the test's own); the
    kernel-cache variables compile_cache sets are restored after."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    saved = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    yield {"compile": True, "compile_mode": "reduce-overhead", "compile_cache_dir": tmp_path / "inductor"}
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def fresh(tiny_ckpt: Path) -> StreamDiffVSR:
    """A model of its own: its compiled sets and lock must not reach the session's shared one."""
    return StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")


def test_graphed_pipelines_share_one_worker_per_device(tiny_ckpt: Path, fresh: StreamDiffVSR,
                                                       graphs_mode: dict[str, object],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A second loaded model (another dtype, a reloaded script) runs on the same thread: one graph tree and one
    memory pool per device. Pipelines without CUDA graphs run on the caller's thread."""
    other = StreamDiffVSR.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16")
    a, b = fresh.with_options(**graphs_mode), other.with_options(**graphs_mode)
    assert a.worker is not None and a.worker is b.worker is Worker.for_device(torch.device("cpu"))
    assert a.denoiser.step_warm is not b.denoiser.step_warm  # compiled per model
    assert fresh.worker is None and fresh.with_options(**{**graphs_mode, "compile_mode": "default"}).worker is None
    ran_on: list[str] = []
    eager = b.denoiser.step_cold
    monkeypatch.setattr(b.denoiser, "step_cold", lambda *args: ran_on.append(threading.current_thread().name)
                        or eager(*args))
    frames, noises = frames_and_noise(1, 32, 32)
    hq, state = b.process_frame(frames[0], noise=noises[0])  # cold: eager, on the shared worker
    assert hq.shape == (1, 3, 128, 128) and state.frame_count == 1
    assert set(ran_on) == {a.worker.thread_name} and len(ran_on) == 4


def test_worker_threads_get_cudagraph_tree_state() -> None:
    """torch < 2.13 set the graph trees' thread-local state only on the importing thread (pytorch#123177): a
    bare thread lacks it, the worker's thread has it before the first graphed call."""
    from torch._inductor import cudagraph_trees as trees

    def probe() -> bool:
        present = hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers")
        if present:
            trees.get_container(0)  # what a graphed call looks up first; asserts on torch < 2.13 without it
        return present

    seen: list[bool] = []
    bare = threading.Thread(target=lambda: seen.append(probe()))
    bare.start()
    bare.join()
    seen.append(Worker.for_device(torch.device("cpu")).run(probe))
    assert seen == [False, True]


def test_a_graphed_call_under_the_models_lock_is_an_error_not_a_deadlock(fresh: StreamDiffVSR,
                                                                         graphs_mode: dict[str, object]) -> None:
    """The worker thread takes the model's lock; a caller already holding it would wait forever."""
    graphed = fresh.with_options(**graphs_mode)
    assert graphed.worker is not None and graphed.lock is fresh.lock  # views share the model's lock
    frames, noises = frames_and_noise(1, 32, 32)
    outcome: list[str] = []

    def call() -> None:
        with graphed.lock:
            try:
                graphed.process_frame(frames[0], noise=noises[0])
                outcome.append("returned")
            except RuntimeError as exc:
                outcome.append(str(exc))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(60)
    assert outcome and "holds the model's lock" in outcome[0], outcome or "deadlocked"
    hq, _ = graphed.process_frame(frames[0], noise=noises[0])  # without the lock held: runs on the worker
    assert hq.shape == (1, 3, 128, 128)


def test_cudnn_autotune_defaults() -> None:
    """On CUDA: on for eager and compile modes without CUDA graphs, off under CUDA graphs (their warm-up peaked
    far above the steady memory); off on the CPU; an explicit choice wins."""
    modes = {None: Options(device="cuda", compile=False)}
    modes.update({m: Options(device="cuda", compile=True, compile_mode=m) for m in
                  ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")})
    assert {m: o.autotune for m, o in modes.items()} == {None: True, "default": True,
                                                         "max-autotune-no-cudagraphs": True,
                                                         "reduce-overhead": False, "max-autotune": False}
    assert Options(device="cuda", compile=True, cudnn_benchmark=True).autotune
    assert not Options(device="cuda", cudnn_benchmark=False).autotune
    assert not Options(device="cpu").autotune and Options(device="cpu", cudnn_benchmark=True).autotune


def test_cudnn_and_tf32_flags_are_set_while_running_and_restored(fresh: StreamDiffVSR,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """cudnn_benchmark while a frame runs, and TF32 float32 matmuls on CUDA (as the reference runs); the caller's
    values come back after the frame."""
    seen: list[tuple[bool, bool]] = []
    view = fresh.with_options(cudnn_benchmark=True)
    eager = view.denoiser.step_cold

    def spy(*args: torch.Tensor) -> torch.Tensor:
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32))
        return eager(*args)

    monkeypatch.setattr(view.denoiser, "step_cold", spy)
    monkeypatch.setattr(view.model.runtime, "device", torch.device("cuda"))  # TF32 is a CUDA model's choice
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a torch property object: monkeypatch cannot undo it
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        frames, noises = frames_and_noise(1, 32, 32)
        view.process_frame(frames[0], StreamState(), noise=noises[0])
        assert seen == [(True, True)] * 4
        assert torch.backends.cudnn.benchmark is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert not fresh.options.autotune  # the CPU default


def test_run_flags_of_two_pipelines_on_two_threads_restore_the_users_values() -> None:
    """A enters, B enters, A leaves, B leaves (two models with locks of their own): the user's flags come back
    at the end, and B keeps its own while it runs."""
    user = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def pipeline_a() -> None:
        with run_flags(True, True):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def pipeline_b() -> None:
        a_in.wait(5)
        with run_flags(False, False):
            b_in.set()
            a_out.wait(5)
            seen.append((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32))

    threads = [threading.Thread(target=pipeline_a), threading.Thread(target=pipeline_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [(False, False)]
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == user


def test_run_flags_with_torchs_newer_tf32_api() -> None:
    """A process that set TF32 through fp32_precision: reading the legacy flag would raise ("mix of the legacy
    and new APIs"), so the flags are kept in the new API (a subprocess: the choice is process-wide)."""
    code = (
        "import torch\n"
        "from vsstreamdiffvsr.pipeline.runtime import run_flags\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "with run_flags(False, False):\n"
        "    assert torch.backends.cuda.matmul.fp32_precision == 'ieee'\n"
        "assert torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

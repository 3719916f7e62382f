"""The pure parts of ``vsstreamdiffvsr encode``: the planner, the scheduling policy, the fingerprint, the driver loop
with scripted workers, the progress lines, and the scaling simulation over the real planner and policy.
A few seconds."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from vsstreamdiffvsr.encode.errors import EncodeError
from vsstreamdiffvsr.encode.plan import Plan, describe_changes, fingerprint, make_chunks
from vsstreamdiffvsr.encode.progress import Display
from vsstreamdiffvsr.encode.scheduler import Events, Finished, Lost, Policy, drive
from vsstreamdiffvsr.encode.worker import PartResult, Progress, Task

REPO = Path(__file__).resolve().parents[1]


def _covers(chunks, total: int) -> None:
    """Chunks tile 0..total-1 in order, and each chunk's parts tile the chunk."""
    pos = 0
    for i, c in enumerate(chunks):
        assert c.index == i and c.start == pos and c.end > c.start
        assert c.parts[0].start == c.start and c.parts[-1].end == c.end
        assert all(a.end == b.start for a, b in zip(c.parts, c.parts[1:]))
        pos = c.end
    assert pos == total


def test_short_scenes_are_grouped_up_to_a_part_and_long_ones_stand_alone() -> None:
    cuts = [10, 20, 25, 60, 200]
    chunks = make_chunks(230, cuts, max_chunk=1000, warmup=8, part_frames=30)
    _covers(chunks, 230)
    assert [(c.start, c.end, c.cuts) for c in chunks] == [(0, 25, (10, 20)), (25, 60, ()), (60, 200, ()),
                                                          (200, 230, ())]
    assert all(c.compute_start == c.start for c in chunks)  # whole scenes: no warm-up
    # a 140-frame scene in parts of at most 30, balanced (28 each)
    assert [p.frames for p in chunks[2].parts] == [28, 28, 28, 28, 28]


def test_a_scene_past_max_chunk_is_split_evenly_with_warmup_inside_the_scene() -> None:
    chunks = make_chunks(1000, [100], max_chunk=300, warmup=16, part_frames=100)
    _covers(chunks, 1000)
    # the 900-frame scene in three pieces of 300; pieces two and three start cold 16 frames early
    assert [(c.start, c.end, c.compute_start) for c in chunks] == [
        (0, 100, 0), (100, 400, 100), (400, 700, 384), (700, 1000, 684)]
    # warm-up never reaches back over the scene's start
    short = make_chunks(40, [10], max_chunk=15, warmup=16, part_frames=100)
    assert [(c.start, c.compute_start) for c in short] == [(0, 0), (10, 10), (25, 10)]
    assert short[2].compute_frames == 30 and short[2].frames_from(0) == 30


def test_the_plan_is_a_pure_function_of_cuts_and_settings() -> None:
    a = make_chunks(5000, [7, 900, 901, 4000], max_chunk=700, warmup=4, part_frames=120)
    b = make_chunks(5000, [4000, 901, 900, 7, 0, 5000, 9999], max_chunk=700, warmup=4, part_frames=120)
    assert a == b  # order, duplicates and out-of-range cuts do not matter
    plan = Plan("f", {"s": 1}, {"seed": 0}, 5000, (7, 900, 901, 4000), a)
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError):
        make_chunks(10, [], max_chunk=0, warmup=0, part_frames=5)


def test_fingerprint_and_the_report_of_what_changed() -> None:
    source, settings = {"digest": "abc", "frames": 10}, {"seed": 0, "encoder": ["-c:v", "ffv1"]}
    fp = fingerprint(source, settings)
    assert fp == fingerprint(dict(source), dict(settings)) and fp != fingerprint(source, {**settings, "seed": 1})
    old = Plan(fp, source, settings, 10, (), make_chunks(10, [], max_chunk=10, warmup=0, part_frames=10))
    assert describe_changes(old, source, {**settings, "seed": 3}) == "seed 0 -> 3"
    assert describe_changes(old, {**source, "digest": "x"}, settings) == "the source (digest)"


def test_policy_longest_first_and_a_lost_chunk_resumes_from_its_first_unfinished_part() -> None:
    chunks = make_chunks(100, [10, 50, 60], max_chunk=1000, warmup=0, part_frames=20)
    policy = Policy(chunks, finished={(1, 0)})  # chunk 1 = frames 10-49 (parts 10-29, 30-49), first part done
    order = []
    while (task := policy.next()) is not None:
        order.append((task.chunk.index, task.first_part, task.frames))
    assert order == [(3, 0, 40), (1, 1, 20), (0, 0, 10), (2, 0, 10)]
    policy.part_done(3, 0)
    again = policy.lost(Task(chunks[3], 0), "worker died")
    assert (again.chunk.index, again.first_part, again.attempt) == (3, 1, 2)
    assert policy.next() is again
    with pytest.raises(EncodeError, match="lost its worker 3 times"):
        policy.lost(Task(chunks[3], 1, attempt=3), "worker died")


class _Scripted:
    """A slot that plays back each task as Progress and PartResult events, optionally losing a task once."""

    def __init__(self, name: str, events: Events, lose: set[tuple[int, int]]) -> None:
        self.name, self.events, self.lose, self.runs = name, events, lose, []

    def start(self, task: Task, state: bytes | None) -> None:
        self.runs.append((task.chunk.index, task.first_part, state))
        for part in task.chunk.parts[task.first_part:]:
            if (task.chunk.index, part.index) in self.lose:
                self.lose.discard((task.chunk.index, part.index))
                self.events.put(self, Lost(task, "killed"))
                return
            self.events.put(self, Progress(task.chunk.index, part.frames))
            self.events.put(self, PartResult(task.chunk.index, part.index, part.frames, b"seg",
                                             f"state{part.index}".encode(), 0.0, self.name))
        self.events.put(self, Finished(task))

    def stop(self) -> None:
        pass

    def ack(self) -> None:
        pass


def test_driver_stores_every_part_once_and_retries_a_lost_task_with_its_state() -> None:
    chunks = make_chunks(90, [30], max_chunk=1000, warmup=0, part_frames=20)  # chunk 1: frames 30-89, 3 parts
    events = Events()
    slots = [_Scripted("a", events, {(1, 2)}), _Scripted("b", events, set())]
    stored, frames = [], []
    policy = Policy(chunks, finished=())
    drive(policy, slots, events, state_of=lambda c, p: f"saved {c}/{p}".encode(),
          on_part=lambda slot, r: stored.append((r.chunk, r.part)), on_progress=lambda slot, n: frames.append(n),
          tick=0.01)
    assert sorted(stored) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)] and len(stored) == len(set(stored))
    assert sum(frames) == 90
    runs = slots[0].runs + slots[1].runs
    assert (1, 2, b"saved 1/1") in runs  # the retry starts at the lost part with the state saved after the one before


def test_plain_progress_lines_when_not_a_terminal() -> None:
    buf = io.StringIO()
    bars = Display(100, 20, ["w0", "w1"], stream=buf, interval=0.0, tty=False)
    bars.chunk("w0", "chunk 3")
    bars.frames("w0", 10)
    bars.frames("w1", 5)
    bars.close()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "encode: 20 of 100 frames done before this run"
    assert lines[-1].startswith("encode: 35 of 100 frames (35.0%)") and "w0" in lines[-1] and "(chunk 3)" in lines[-1]


def test_simulation_runs_the_real_planner_and_policy() -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "simulate_encode.py"), "--hours", "0.5", "--gpus",
                          "1", "8", "64"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "8", "64"]
    eff = [float(r.split("|")[4].strip().rstrip("%")) for r in rows]
    assert eff[0] == 100.0 and eff[0] > eff[1] > eff[2]


def test_model_identity_follows_the_weights_not_the_prompt_cache(tmp_path: Path) -> None:
    from vsstreamdiffvsr.encode.run import _model_identity
    from vsstreamdiffvsr.weights.layout import PROMPT_CACHE_NAME

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "unet" / "w.safetensors").write_bytes(bytes(range(256)) * 20000)  # past 2 MiB: sampled
    first = _model_identity(tmp_path)
    (tmp_path / PROMPT_CACHE_NAME).write_bytes(b"written by the first load")
    assert _model_identity(tmp_path) == first
    (tmp_path / "unet" / "config.json").write_text('{"a": 1}')
    assert _model_identity(tmp_path) != first

"""The ordered producer's rules, without VapourSynth or a model (a toy recurrence stands in)."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import pytest
import torch

from vsstreamdiffvsr.filter.producer import OrderedProducer, SourceFrame
from vsstreamdiffvsr.pipeline.inputs import frame_noise, frame_seed


@dataclass(frozen=True)
class Run:
    """The toy carry: where the current run started (None: cold), and what the previous step saw ahead."""

    start: int | None = None
    ahead: int | None = None


def toy_step(log: list[int], peeks: list | None = None):
    """out[i] = (run start, i, payload); the carry remembers the run start."""

    def step(i: int, payload: int, peek, carry: Run):
        log.append(i)
        if peeks is not None:
            nxt = peek()
            peeks.append((i, carry.ahead, None if nxt is None else nxt.payload))
        start = i if carry.start is None else carry.start
        return (start, i, payload), Run(start)

    return step


def producer(step, **kwargs) -> OrderedProducer:
    return OrderedProducer(step, cold=Run, **kwargs)


class Cuts:
    """A source of payload i * 10 with scene cuts at ``cuts``; frames in ``bad`` cannot be had."""

    def __init__(self, cuts=(), bad=(), at_hand=True) -> None:
        self.cuts, self.bad, self.at_hand = set(cuts), set(bad), at_hand
        self.fetched: list[int] = []

    def fetch(self, i: int) -> SourceFrame:
        self.fetched.append(i)
        if i in self.bad:
            raise RuntimeError(f"corrupt packet in source frame {i}")
        return SourceFrame(payload=i * 10, scene_cut=i in self.cuts)

    def peek(self, i: int):
        if not self.at_hand or i in self.bad:
            return None
        return SourceFrame(payload=i * 10, scene_cut=i in self.cuts)


def fetch_with_cuts(cuts=()):
    return Cuts(cuts)


def test_in_order_is_one_run() -> None:
    log: list[int] = []
    p = producer(toy_step(log), max_gap=4)
    outs = [p.get(n, fetch_with_cuts()) for n in range(10)]
    assert outs == [(0, n, n * 10) for n in range(10)]
    assert log == list(range(10)) and p.seeks == 0


def test_first_burst_is_a_catch_up_from_zero() -> None:
    log: list[int] = []
    p = producer(toy_step(log), max_gap=8)
    for n in (3, 0, 7, 1, 2, 6, 5, 4):
        assert p.get(n, fetch_with_cuts()) == (0, n, n * 10)
    assert log == list(range(8))  # each frame computed once


def test_jump_beyond_max_gap_and_backward_are_seeks() -> None:
    log: list[int] = []
    p = producer(toy_step(log), max_gap=4)
    for n in range(3):
        p.get(n, fetch_with_cuts())
    assert p.get(7, fetch_with_cuts()) == (7, 7, 70)   # 7 - 2 = 5 > max_gap: seek, cold start at 7
    assert p.seeks == 1
    assert p.get(8, fetch_with_cuts()) == (7, 8, 80)
    assert p.get(12, fetch_with_cuts()) == (7, 12, 120)  # 12 - 8 = 4: caught up
    assert p.get(9, fetch_with_cuts()) == (7, 9, 90)    # cached from the catch-up
    log.clear()
    p2 = producer(toy_step(log), max_gap=2)       # cache of 4
    for n in range(10):
        p2.get(n, fetch_with_cuts())
    assert p2.get(1, fetch_with_cuts()) == (1, 1, 10)    # evicted long ago: backward seek, cold at 1
    assert p2.seeks == 1


def test_a_seek_drops_the_frames_of_the_run_it_leaves() -> None:
    """Back to 20 after frames 31-33 were computed ahead in a run started at 30: playing on from 20 must
    not serve them (two runs mixed), nor leave the new run behind (35 would be one more seek)."""
    p = producer(toy_step([]), max_gap=4)
    assert p.get(30, fetch_with_cuts()) == (30, 30, 300)
    assert p.get(34, fetch_with_cuts()) == (30, 34, 340)  # 31..33 computed and kept, not delivered
    outs = [p.get(n, fetch_with_cuts()) for n in range(20, 38)]
    assert [o[0] for o in outs] == [20] * 18
    assert p.seeks == 2


def test_seek_landing_exactly_max_gap_ahead_is_caught_up() -> None:
    p = producer(toy_step([]), max_gap=4)
    p.get(0, fetch_with_cuts())
    assert p.get(4, fetch_with_cuts()) == (0, 4, 40)
    assert p.get(9, fetch_with_cuts()) == (5 + 4, 9, 90)  # 9 - 4 = 5 > 4 -> seek: cold at 9
    assert p.seeks == 1


def test_warmup_frames_are_computed_and_discarded() -> None:
    log: list[int] = []
    p = producer(toy_step(log), max_gap=2, warmup=3)
    p.get(0, fetch_with_cuts())
    log.clear()
    assert p.get(20, fetch_with_cuts()) == (17, 20, 200)
    assert log == [17, 18, 19, 20]
    log.clear()
    assert p.get(19, fetch_with_cuts()) == (16, 19, 190)  # warm-up frames were not cached: a seek
    assert p.get(1, fetch_with_cuts()) == (0, 1, 10)      # warmup clipped at frame 0


def test_scene_cut_starts_a_new_run() -> None:
    p = producer(toy_step([]), max_gap=4)
    outs = [p.get(n, fetch_with_cuts({3, 6})) for n in range(8)]
    assert [o[0] for o in outs] == [0, 0, 0, 3, 3, 3, 6, 6]
    p = producer(toy_step([]), max_gap=4, reset_on_scene_change=False)
    assert [p.get(n, fetch_with_cuts({3}))[0] for n in range(5)] == [0] * 5
    # a seek's warm-up stops at a cut inside it
    p = producer(toy_step([]), max_gap=2, warmup=5)
    p.get(0, fetch_with_cuts({18}))
    assert p.get(20, fetch_with_cuts({18})) == (18, 20, 200)


def test_cache_is_bounded_and_keeps_undelivered_frames() -> None:
    p = producer(toy_step([]), max_gap=4)
    assert p.cache_size == 8
    for base in range(0, 200, 4):
        p.get(base + 3, fetch_with_cuts())  # produce 4 frames, deliver only the last
        for k in range(3):
            assert p.get(base + k, fetch_with_cuts()) == (0, base + k, (base + k) * 10)
        assert len(p._cache) <= 8
    assert p.seeks == 0


def test_delivered_frames_are_kept_within_their_own_bound() -> None:
    """keep_delivered bounds the frames already handed out (4K outputs are 100 MB each); frames computed
    ahead and not yet asked for are never dropped for it."""
    p = producer(toy_step([]), max_gap=4, keep_delivered=2)
    for n in range(20):
        p.get(n, fetch_with_cuts())
        assert len(p._cache) <= 2
    assert p.get(23, fetch_with_cuts()) == (0, 23, 230)    # 20..22 computed ahead, kept
    assert all(k in p._cache for k in (20, 21, 22))
    assert [p.get(n, fetch_with_cuts())[1] for n in (20, 21, 22)] == [20, 21, 22] and p.seeks == 0
    assert sorted(p._cache) == [22, 23]                     # the two most recently delivered
    assert p.get(22, fetch_with_cuts()) == (0, 22, 220) and p.seeks == 0  # asked again: served
    assert p.get(21, fetch_with_cuts())[0] == 21 and p.seeks == 1         # beyond the bound: a seek


def test_a_frame_that_fails_fails_alone_and_the_run_restarts_after_it() -> None:
    """Source frame 3 cannot be had: output 3 raises its error, 2 and 4.. are made (4 starts a new run)."""
    src = Cuts(bad={3})
    p = producer(toy_step([]), max_gap=8)
    assert [p.get(n, src) for n in range(3)] == [(0, n, n * 10) for n in range(3)]
    with pytest.raises(RuntimeError, match="source frame 3"):
        p.get(3, src)
    assert p.last_produced == 2  # nothing committed for the frame that failed
    with pytest.warns(RuntimeWarning, match="frame 3 failed.*restarts cold at frame 4"):
        assert p.get(5, src) == (4, 5, 50)  # caught up past 3: a new run from 4
    assert p.get(4, src) == (4, 4, 40) and p.restarts == 1
    with pytest.raises(RuntimeError, match="source frame 3"):
        p.get(3, src)  # asked for again: still its own error


def test_a_failed_step_while_catching_up_fails_only_its_frame() -> None:
    inner = toy_step([])

    def flaky(i, payload, peek, carry):
        if i == 3:
            raise RuntimeError("boom")
        return inner(i, payload, peek, carry)

    p = producer(flaky, max_gap=8)
    with pytest.warns(RuntimeWarning, match="frame 3 failed"):
        assert p.get(5, fetch_with_cuts()) == (4, 5, 50)
    assert p.get(6, fetch_with_cuts()) == (4, 6, 60)
    with pytest.raises(RuntimeError, match="boom"):
        p.get(3, fetch_with_cuts())


def test_the_step_sees_the_next_frame_and_a_look_that_fails_is_none() -> None:
    peeks: list = []
    p = producer(toy_step([], peeks), max_gap=4, length=4)
    src = Cuts(bad={2})
    p.get(0, src), p.get(1, src)
    with pytest.warns(RuntimeWarning, match="frame 2 failed"):
        p.get(3, src)
    # frame 1 looked at 2, which cannot be had: None, not an error; frame 3 is the last: nothing to look at
    assert [(i, nxt) for i, _, nxt in peeks] == [(0, 10), (1, None), (3, None)]


def test_the_carry_resets_at_cuts_and_seeks() -> None:
    seen: list = []

    def step(i, payload, peek, carry):
        seen.append((i, carry.ahead))
        nxt = peek()
        return i, Run(0, None if nxt is None else nxt.payload)  # hands the next frame what it saw

    p = producer(step, max_gap=2)
    for n in range(4):
        p.get(n, Cuts(cuts={2}))
    p.get(10, Cuts())  # a seek
    assert seen == [(0, None), (1, 10), (2, None), (3, 30), (10, None)]


def test_threads_in_any_order_give_the_sequential_result() -> None:
    truth_producer = producer(toy_step([]), max_gap=8)
    truth = [truth_producer.get(n, fetch_with_cuts({11})) for n in range(40)]
    for trial in range(5):
        log: list[int] = []
        p = producer(toy_step(log), max_gap=8)
        results: dict[int, tuple] = {}
        rng = random.Random(trial)
        # emulate vspipe -r 8: windows of 8 in-flight frames, requested in shuffled order by 4 threads
        for base in range(0, 40, 8):
            batch = list(range(base, base + 8))
            rng.shuffle(batch)
            threads = [threading.Thread(target=lambda n=n, p=p, results=results: results.__setitem__(
                n, p.get(n, fetch_with_cuts({11})))) for n in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        assert [results[n] for n in range(40)] == truth
        assert sorted(log) == list(range(40))


def test_frame_noise_is_a_pure_function_of_seed_and_index() -> None:
    a = frame_noise(0, 5, (1, 4, 8, 8))
    assert torch.equal(a, frame_noise(0, 5, (1, 4, 8, 8)))
    assert not torch.equal(a, frame_noise(0, 6, (1, 4, 8, 8)))
    assert not torch.equal(a, frame_noise(1, 5, (1, 4, 8, 8)))
    assert frame_seed(0, 5) != frame_seed(5, 0)
    assert abs(float(frame_noise(3, 9, (1, 4, 64, 64)).std()) - 1.0) < 0.05


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        producer(toy_step([]), max_gap=0)
    with pytest.raises(ValueError):
        producer(toy_step([]), warmup=-1)

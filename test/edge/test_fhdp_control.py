"""The edge's FHDP control plane: step numbering that never repeats, and waiting for every stage's report."""

import itertools
import threading
import time

import pytest

from flad_core import codec
from flad_edge.fhdp.control import READY, ReportBoard, StepNumbers


def _report(vehicle: str, pid: str, error: str = "", steps: int = 0):
    return codec.new("flad_msgs/msg/StepReport", header=codec.header(), vehicle_id=vehicle, pipeline_id=pid,
                     steps_done=steps, error=error)


def test_step_ranges_never_overlap_even_past_ten_thousand_steps_a_round():
    numbers = StepNumbers()
    taken: list[tuple[int, int]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for _ in range(50):
            first = numbers.take(n)
            with lock:
                taken.append((first, first + n))

    threads = [threading.Thread(target=client, args=(n,)) for n in (1, 7, 12_000, 30_001)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken.sort()
    assert len(taken) == 200
    assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(taken))
    assert numbers.peek() == taken[-1][1] == 50 * (1 + 7 + 12_000 + 30_001)


def test_wait_collects_every_stage_and_names_the_missing_ones():
    board = ReportBoard()

    def late() -> None:
        time.sleep(0.05)
        board.record(READY, _report("b", "p1"))

    board.record(READY, _report("a", "p1"))
    threading.Thread(target=late).start()
    got = board.wait(READY, "p1", ["a", "b"], timeout_s=5)
    assert sorted(got) == ["a", "b"] and got["b"].vehicle_id == "b"
    with pytest.raises(TimeoutError, match=r"\['c'\] did not report ready for p1"):
        board.wait(READY, "p1", ["a", "c"], timeout_s=0.1)


def test_an_error_report_fails_the_wait_unless_the_caller_takes_it():
    board = ReportBoard()
    board.record(READY, _report("a", "p2", error="aborted after 1 of 3 steps"))
    with pytest.raises(RuntimeError, match="a failed ready of p2: aborted"):
        board.wait(READY, "p2", ["a"], timeout_s=1)
    got = board.wait(READY, "p2", ["a"], timeout_s=1, on_error=lambda v, rep: rep.error.startswith("aborted"))
    assert got["a"].error.startswith("aborted")


def test_a_failure_check_ends_the_wait_at_once():
    board = ReportBoard()

    def check() -> None:
        raise ConnectionError("b left")

    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="b left"):
        board.wait(READY, "p3", ["a", "b"], timeout_s=30, check=check)
    assert time.monotonic() - t0 < 1

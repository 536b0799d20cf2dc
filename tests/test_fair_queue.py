"""FairQueue: clients take turns, each client's jobs keep their order, requeued jobs go first."""

from __future__ import annotations

import pytest

from protocol.fair_queue import FairQueue


def drain(queue: FairQueue) -> list[str]:
    return [queue.popleft() for _ in range(len(queue))]


def test_clients_take_turns_and_keep_their_own_order() -> None:
    queue = FairQueue()
    for i in range(4):
        queue.append(f"a{i}", b"a")
    queue.append("b0", b"b")
    queue.append("b1", b"b")
    queue.append("c0", b"c")
    assert list(queue) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert len(queue) == 0 and not queue


def test_a_client_that_arrives_later_is_served_next() -> None:
    queue = FairQueue()
    for i in range(100):
        queue.append(f"a{i}", b"a")
    assert queue.popleft() == "a0"
    queue.append("b0", b"b")
    assert [queue.popleft(), queue.popleft()] == ["a1", "b0"]  # not behind a's other 98


def test_requeued_jobs_go_first_and_removal_works_everywhere() -> None:
    queue = FairQueue()
    queue.append("a0", b"a")
    queue.append("a1", b"a")
    queue.append("b0", b"b")
    lost = queue.popleft()  # a0 went to a node that died
    queue.appendleft(lost)
    assert "a0" in queue and "b0" in queue and len(queue) == 3
    queue.remove("b0")  # b's only job: b leaves the rotation
    assert "b0" not in queue
    queue.append("c0", b"c")
    assert drain(queue) == ["a0", "a1", "c0"]
    queue.append("d0", b"d")
    queue.appendleft("x")
    queue.remove("x")
    queue.remove("d0")
    assert len(queue) == 0
    with pytest.raises(ValueError):
        queue.remove("d0")
    with pytest.raises(IndexError):
        queue.popleft()

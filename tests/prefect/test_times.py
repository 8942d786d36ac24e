"""The parts of one batch share the generation times they see (tasks/times.py)."""

from __future__ import annotations

from uuid import uuid4

from tasks.times import SharedTimes, forget


async def test_parts_of_one_batch_learn_each_others_times_once_and_no_other_batchs() -> None:
    batch = str(uuid4())
    first, second = SharedTimes(batch, "part1"), SharedTimes(batch, "part2")
    for seconds in (131.0, 142.0, 153.0):
        first.observe("sora2", 10, seconds)
    assert await first.share() == 0  # published; nothing from the other part yet
    assert await second.share() == 3
    assert {131.0, 142.0, 153.0} <= set(second.samples("sora2", 10))
    assert await second.share() == 0  # never learned twice
    second.observe("sora2-pro", 15, 377.0)
    await second.share()
    assert await first.share() == 1
    assert 377.0 in first.samples("sora2-pro", 15)
    assert await SharedTimes(str(uuid4()), "part1").share() == 0  # another batch's: not its
    await forget(batch)
    assert await SharedTimes(batch, "part3").share() == 0  # removed when the batch is done

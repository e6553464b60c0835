"""proxy/deadline.py: `Deadline` keeps `asyncio.timeout_at`'s semantics, and far deadlines fire on time without
a loop timer until they come near. The wheel's tick is shrunk here so that "far" takes tenths of a second."""

from __future__ import annotations

import asyncio

import pytest

from proxy import deadline
from proxy.deadline import Deadline, call_at

TICK = 0.05


@pytest.fixture(autouse=True)
def fast_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadline, "_TICK_S", TICK)
    monkeypatch.setattr(deadline, "_NEAR_S", 2 * TICK)
    monkeypatch.setattr(deadline, "_MARGIN_S", TICK / 20)


def pending() -> int:
    wheel = deadline._local.wheel
    return 0 if wheel is None else len(wheel.pending)


@pytest.mark.parametrize("ahead", [0.02, 6 * TICK], ids=["near", "far"])
async def test_a_deadline_passing_inside_the_block_is_a_timeout_error_at_its_time(ahead):
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        with Deadline(start + ahead):
            await asyncio.sleep(10)
    took = loop.time() - start
    # Never early (the loop clock counts whole ms); the upper bound only catches "much later", since a loaded
    # machine delays any timer.
    assert ahead - 0.002 <= took < ahead + 1.0
    assert pending() == 0


async def test_a_block_that_ends_in_time_leaves_no_timer_for_a_far_deadline():
    loop = asyncio.get_running_loop()
    with Deadline(loop.time() + 60) as d:
        assert pending() == 1  # noted in the wheel, no loop timer
        await asyncio.sleep(0)
    assert pending() == 0 and d.expired is False
    await asyncio.sleep(3 * TICK)  # the wheel's looks find nothing to arm, and the block is not cancelled later
    assert d.expired is False


async def test_a_cancellation_from_outside_stays_a_cancellation():
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        with Deadline(loop.time() + 60):
            await asyncio.sleep(10)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()  # the client left: not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pending() == 0


async def test_a_cancellation_from_outside_with_the_deadline_passing_too_stays_a_cancellation():
    """As in asyncio.timeout_at: the deadline's own cancel is taken back, the other one is not."""
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def guarded() -> None:
        with Deadline(loop.time()):  # already due: expires on the loop's next turn
            entered.set()
            loop.call_soon(task.cancel)  # and someone else cancels on that same turn
            await asyncio.sleep(10)

    task = asyncio.create_task(guarded())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert entered.is_set()


async def test_the_timeout_error_chains_the_cancellation_and_the_task_can_go_on():
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError) as caught:
        with Deadline(loop.time() + 0.01):
            await asyncio.sleep(10)
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)
    assert asyncio.current_task().cancelling() == 0  # uncancelled: later awaits are not cancelled
    await asyncio.sleep(0.01)


async def test_call_at_far_runs_at_its_time_and_a_cancelled_one_never_runs():
    loop = asyncio.get_running_loop()
    fired: dict[str, float] = {}
    start = loop.time()
    call_at(loop, start + 5 * TICK, lambda name: fired.setdefault(name, loop.time()), "kept")
    dropped = call_at(loop, start + 5 * TICK, lambda name: fired.setdefault(name, loop.time()), "dropped")
    assert pending() == 2
    dropped.cancel()
    assert pending() == 1
    for _ in range(200):  # until it has run (a loaded machine delays timers), and then the other had its time too
        if "kept" in fired:
            break
        await asyncio.sleep(TICK)
    assert set(fired) == {"kept"}
    assert 5 * TICK - 0.002 <= fired["kept"] - start < 5 * TICK + 1.0


async def test_call_at_near_is_a_plain_loop_timer():
    loop = asyncio.get_running_loop()
    handle = call_at(loop, loop.time() + TICK, print, "never")
    assert isinstance(handle, asyncio.TimerHandle) and pending() == 0
    handle.cancel()


def test_deadline_outside_a_task_is_an_error():
    with pytest.raises(RuntimeError):
        Deadline(0.0)

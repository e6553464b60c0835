"""Deadlines for the request path: `Deadline` (`asyncio.timeout_at` at a fraction of its cost) and `call_at`.

Why: every upstream attempt runs under deadlines (its total time; the lean client's first byte), each minutes
away (proxy/config.py `Timeouts`), while the attempt itself ends within milliseconds. A loop timer per deadline
costs ≈ 2 µs on this kind of machine to arm and cancel (uvloop's TimerHandle), and Python 3.11's
`asyncio.timeout_at` ≈ 8 µs (a `Timeout` object, two coroutines for `async with`, a state machine).

How: a deadline more than `_NEAR_S` away is only noted in its loop's `_Wheel` (a dict insert, and a delete when
it is cancelled); once a second the wheel gives each deadline due before its next look a real loop timer. So a
deadline still fires at its time, exactly as a loop timer would (the loop's clock and resolution), and one that
is cancelled in time — nearly all of them — never costs a timer.

`Deadline` keeps `asyncio.timeout_at`'s semantics as Python 3.11 implements them: when the deadline passes inside
the block, the task is cancelled, and the `CancelledError` that leaves the block becomes a `TimeoutError` —
unless someone else cancelled the task too (a client that left), which stays a cancellation. Use it only around
code that runs in the current task (`with Deadline(when):` inside a coroutine).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

_TICK_S = 1.0  # how often a wheel looks for deadlines that come due
_NEAR_S = 2 * _TICK_S  # a deadline closer than this gets a loop timer at once
_MARGIN_S = 0.05  # a deadline due this soon after the next look is handed its timer now (ticks may run late)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


def call_at(loop: asyncio.AbstractEventLoop, when: float, fn: Callable[[Any], object], arg: Any) -> Cancellable:
    """`loop.call_at(when, fn, arg)`, without a loop timer while `when` is far away (see the module docstring)."""
    if when - loop.time() < _NEAR_S:
        return loop.call_at(when, fn, arg)
    wheel = _local.wheel
    if wheel is None or wheel.loop is not loop:
        wheel = _local.wheel = _Wheel(loop)
    far = _Far(wheel, when, fn, arg)
    wheel.add(far)
    return far


class _Far:
    """A far deadline waiting in its wheel; then (`handle`) the loop timer the wheel gave it."""

    __slots__ = ("arg", "fn", "handle", "wheel", "when")

    def __init__(self, wheel: _Wheel, when: float, fn: Callable[[Any], object], arg: Any) -> None:
        self.wheel = wheel
        self.when = when
        self.fn = fn
        self.arg = arg
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is None:
            self.wheel.pending.pop(self, None)
        else:
            self.handle.cancel()


class _Wheel:
    """One loop's far deadlines (a dict used as an ordered set) and the timer of its next look."""

    __slots__ = ("loop", "pending", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[_Far, None] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, far: _Far) -> None:
        self.pending[far] = None
        if self.timer is None:
            self.timer = self.loop.call_later(_TICK_S, self._tick)

    def _tick(self) -> None:
        self.timer = None
        loop = self.loop
        soon = loop.time() + _TICK_S + _MARGIN_S
        pending = self.pending
        for far in [f for f in pending if f.when <= soon]:
            del pending[far]
            far.handle = loop.call_at(far.when, far.fn, far.arg)
        if pending:
            self.timer = loop.call_later(_TICK_S, self._tick)


class _Local(threading.local):
    wheel: _Wheel | None = None  # the wheel of the loop this thread ran last (a thread runs one loop at a time)


_local = _Local()


class Deadline:
    __slots__ = ("_cancelling", "_handle", "_task", "expired")

    def __init__(self, when: float) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        # A deadline already past fires on the loop's next turn, as asyncio.timeout_at's does.
        self._handle: Cancellable | None = call_at(task.get_loop(), when, _expire, self)

    def __enter__(self) -> Deadline:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        handle, self._handle = self._handle, None  # the handle holds this deadline: no cycle left for the collector
        if handle is not None:
            handle.cancel()
        if self.expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


def _expire(deadline: Deadline) -> None:
    # Module-level, so that arming a deadline allocates no bound method.
    deadline.expired = True
    deadline._task.cancel()

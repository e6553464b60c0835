"""Retry and hedge budgets: extra attempts allowed as a share of recent requests, plus a small floor.

# Why budgets and not "max retries"?
A fixed retry count multiplies load exactly when an upstream is struggling: with 3 retries, an outage
quadruples traffic (a retry storm). A budget caps extra attempts to a share of the requests actually seen
(tower's `retry::budget`, Finagle's RetryBudget), so a bad minute costs at most that share; the floor keeps
retries possible at low traffic, where a storm cannot happen anyway.
"""

from __future__ import annotations

from collections.abc import Callable


class Budget:
    __slots__ = ("_clock", "_deposits", "_floor", "_head", "_ratio", "_slot_s", "_slots", "_withdrawals")

    _SLOTS = 10  # ten slots make the window slide in tenths, smooth enough for admission decisions

    def __init__(
        self, ratio: float, *, window_s: float = 10.0, floor_per_s: float = 0.0, clock: Callable[[], float]
    ) -> None:
        self._ratio = ratio
        self._floor = floor_per_s * window_s
        self._slot_s = window_s / self._SLOTS
        self._clock = clock
        self._deposits = [0] * self._SLOTS
        self._withdrawals = [0] * self._SLOTS
        self._head = int(clock() / self._slot_s)

    def _rotate(self) -> int:
        now_slot = int(self._clock() / self._slot_s)
        gap = now_slot - self._head
        if gap > 0:
            for i in range(1, min(gap, self._SLOTS) + 1):  # bounded: at most one full sweep
                idx = (self._head + i) % self._SLOTS
                self._deposits[idx] = 0
                self._withdrawals[idx] = 0
            self._head = now_slot
        return now_slot % self._SLOTS

    def deposit(self) -> None:
        """One client request seen."""
        self._deposits[self._rotate()] += 1

    def balance(self) -> float:
        self._rotate()
        return self._floor + self._ratio * sum(self._deposits) - sum(self._withdrawals)

    def withdraw(self) -> bool:
        """Spend one extra attempt if the budget allows; False means don't retry/hedge."""
        idx = self._rotate()
        if self._floor + self._ratio * sum(self._deposits) - sum(self._withdrawals) < 1.0:
            return False
        self._withdrawals[idx] += 1
        return True

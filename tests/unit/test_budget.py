"""Retry/hedge budgets: a share of recent requests plus a floor, sliding with the clock."""

from __future__ import annotations

from proxy.budget import Budget


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def test_budget_allows_its_share_of_requests():
    clock = FakeClock()
    b = Budget(0.05, window_s=10, clock=clock)
    for _ in range(100):
        b.deposit()
    allowed = sum(b.withdraw() for _ in range(20))
    assert allowed == 5  # 5% of 100


def test_floor_allows_retries_at_low_traffic():
    clock = FakeClock()
    b = Budget(0.2, window_s=10, floor_per_s=0.3, clock=clock)  # floor: 3 per window
    b.deposit()
    assert [b.withdraw() for _ in range(4)] == [True, True, True, False]


def test_window_slides_so_old_requests_stop_counting():
    clock = FakeClock()
    b = Budget(0.5, window_s=10, clock=clock)
    for _ in range(10):
        b.deposit()
    assert b.balance() == 5
    clock.advance(5)
    assert b.balance() == 5  # still inside the window
    clock.advance(6)
    assert b.balance() == 0  # the deposits aged out
    assert not b.withdraw()


def test_withdrawals_age_out_too():
    clock = FakeClock()
    b = Budget(1.0, window_s=10, clock=clock)
    b.deposit()
    assert b.withdraw() and not b.withdraw()
    clock.advance(11)
    b.deposit()
    assert b.withdraw()

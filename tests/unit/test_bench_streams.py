"""The `streams` benchmark's report from a level's results: its table, checks and lag chart, with the
reference proxies' runs (bare aiohttp, nginx) at the lag level, and without them (an older report)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import charts
from benchmarks.streams import LAG_LEVEL, _added_lag, _checks, _table


def _run(p99: float, lost: int = 0, failed: int = 0) -> dict[str, Any]:
    lag = {"p50": p99 / 4, "p90": p99 / 2, "p99": p99, "p999": p99 * 2, "max": p99 * 3}
    return {
        "streams": LAG_LEVEL,
        "opened": LAG_LEVEL,
        "completed": LAG_LEVEL - failed,
        "failed": failed,
        "max_open": LAG_LEVEL,
        "open_s": 4.0,
        "window_s": 5.0,
        "window_events": 5_000,
        "lost": lost,
        "reordered": 0,
        "lag_ms": lag,
        "lag_all_ms": lag,
        "cdf_ms": [(0.5, p99 / 4), (0.99, p99), (1.0, p99 * 3)],
        "client_cpu_pct": 30.0,
    }


def _level(refs: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    direct, gateway = _run(0.4), _run(1.2)
    lv: dict[str, Any] = {
        "streams": LAG_LEVEL,
        "direct": direct,
        "gateway": gateway,
        "added_lag_ms": _added_lag(gateway, direct),
        "rss_fresh": 40e6,
        "rss_idle": 45e6,
        "rss_open": 80e6,
        "rss_peak": 82e6,
        "rss_after": 50e6,
        "bytes_per_stream": 35_000,
        "fds_idle": 20,
        "fds_peak": 2_020,
        "nofile_limit": 65_536,
        "fds_needed": 2_084,
        "gateway_cpu_pct_open": 20.0,
        "gateway_cpu_pct": 15.0,
        "gateway_cpu": {"other_load_pct": 1.0},
    }
    if refs is not None:
        lv["refs"] = {name: {**r, "added_lag_ms": _added_lag(r, direct)} for name, r in refs.items()}
    return lv


def _check(checks: list[dict[str, Any]], start: str) -> dict[str, Any]:
    (found,) = (c for c in checks if c["name"].startswith(start))
    return found


def test_references_in_table_and_lag_check():
    lv = _level({"bare": _run(3.7), "nginx": _run(3.2)})
    text = _table([lv])
    assert "3.700 / 3.200" in text  # bare / nginx p99
    assert "3.300 / 2.800" in text  # added p99: bare / nginx
    lag = _check(_checks([lv], None, quick=True), "added per-event lag p99")
    assert lag["ok"] is True  # still the gateway's verdict (0.8 ms), whatever the references' tail
    assert "bare aiohttp added p99 3.300 ms, nginx 2.800 ms" in lag["detail"]


def test_references_count_in_the_correctness_checks():
    lv = _level({"bare": _run(3.7, lost=2, failed=1), "nginx": _run(3.2)})
    checks = _checks([lv], None, quick=True)
    lost = _check(checks, "no event lost or reordered")
    assert lost["ok"] is False
    assert f"{LAG_LEVEL:,} bare: 2/0" in lost["detail"]
    failed = _check(checks, "no stream failed")
    assert failed["ok"] is False
    assert f"{LAG_LEVEL:,} bare: 1" in failed["detail"]
    assert "2/0 / 0/0" in _table([lv])  # events lost / reordered: bare / nginx


def test_without_nginx_or_without_references():
    no_nginx = _level({"bare": _run(3.7)})
    assert "3.700 / —" in _table([no_nginx])
    lag = _check(_checks([no_nginx], None, quick=True), "added per-event lag p99")
    assert lag["detail"].endswith("bare aiohttp added p99 3.300 ms, nginx not on PATH")

    old = _level(None)
    assert "bare" not in _table([old])
    checks = _checks([old], None, quick=True)
    assert "same run" not in _check(checks, "added per-event lag p99")["detail"]
    assert all(c["ok"] for c in checks if c["kind"] == "correctness")


def test_lag_cdf_has_the_references_curves(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    series: dict[str, Any] = {}
    monkeypatch.setattr(charts, "latency_cdf", lambda path, s, **kw: series.update(s) or path)
    report = {
        "levels": [_level({"bare": _run(3.7), "nginx": _run(3.2)}), {**_level(None), "streams": 100}],
        "machine": {"nproc": 2, "cpu_model": "test", "python": "3"},
        "settings": {"engine": "lean"},
    }
    charts.streams_lag_cdf(tmp_path / "lag.png", report)
    assert set(series) == {
        f"{LAG_LEVEL:,} via gateway",
        f"{LAG_LEVEL:,} direct",
        f"{LAG_LEVEL:,} via bare aiohttp",
        f"{LAG_LEVEL:,} via nginx",
        "100 via gateway",
        "100 direct",
    }

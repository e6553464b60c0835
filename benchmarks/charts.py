"""PNG charts of benchmark reports, written next to the JSON report (matplotlib's Agg backend: no display).

matplotlib is optional (the `bench` extra: `pip install -e '.[bench]'`); `available()` says whether it is
there, and a scenario without it just skips its charts.

- `latency_cdf`: any scenario's latency CDFs, one curve per series, on a logit y axis (p50, p90, p99, p99.9
  evenly spaced, so the tail is as visible as the median) and a log x axis. A series is (quantile, ms) points:
  `quantile_points` makes them from raw samples, `load_points` from a `benchmarks.load` result's percentiles.
- `streams_charts`: the `streams` scenario's charts (memory vs concurrency, lag CDF per level with the
  reference proxies' curves where they ran, backpressure).
- `overhead_charts`: the `overhead` scenario's non-stream latency CDF (direct, bare, gateway; raw samples).
- `throughput_charts`: the `throughput` scenario's throughput vs p99 (open-loop sweep; closed loop per
  concurrency).

Charts can be drawn again from a saved report: `python -m benchmarks.charts REPORT.json` (a `streams`,
`overhead` or `throughput` one).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

Points = Sequence[tuple[float, float]]  # (quantile in (0, 1], value)

# The logit scale cannot show 0 or 1: quantiles are clipped into this range (the max plots at p99.99).
_Q_LO, _Q_HI = 0.005, 0.9999
_TICKS = (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
_TICK_LABELS = ("p1", "p10", "p50", "p90", "p99", "p99.9", "p99.99")


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def chart_path(json_path: Path, name: str) -> Path:
    """Where a chart of a report goes: beside it, `<report stem>-<name>.png`."""
    return json_path.with_name(f"{json_path.stem}-{name}.png")


def quantile_points(samples: Sequence[float], qs: Sequence[float] | None = None) -> list[tuple[float, float]]:
    """(quantile, value) points of raw samples, nearest rank, dense in the tail; the max as quantile 1."""
    values = sorted(samples)
    n = len(values)
    if not n:
        return []
    qs = qs or (*(i / 100 for i in range(1, 100)), 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999)
    points = [(q, values[max(0, math.ceil(q * n) - 1)]) for q in qs if q * n >= 1]
    return [*points, (1.0, values[-1])]


def load_points(result: Mapping[str, Any], prefix: str = "") -> list[tuple[float, float]]:
    """The percentiles a `benchmarks.load` result has (p50, p90, p99, p999, max; `prefix="ttfb_"` for TTFB)
    as (quantile, ms) points; the ones it lacks are left out."""
    keys = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))
    return [(q, result[prefix + k]) for k, q in keys if result.get(prefix + k) is not None]


def _cdf_axes(ax: Any, xlabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("logit")
    ax.set_ylim(_Q_LO, _Q_HI)
    ax.set_yticks(_TICKS, _TICK_LABELS)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("quantile")
    ax.grid(True, which="both", alpha=0.3)


def _plot_cdf(ax: Any, points: Points, **style: Any) -> None:
    qs = [min(max(q, _Q_LO), _Q_HI) for q, _ in points]
    xs = [max(v, 1e-3) for _, v in points]  # log axis: nothing below 1 µs
    ax.plot(xs, qs, drawstyle="steps-post", **style)


def latency_cdf(
    path: Path,
    series: Mapping[str, Points],
    *,
    title: str,
    xlabel: str = "latency (ms)",
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    marks: Mapping[str, float] | None = None,
) -> Path:
    """One chart: a CDF per series (label → (quantile, value) points). `styles`: matplotlib line keywords per
    label (color, linestyle …); `marks`: vertical reference lines (label → x), e.g. a target."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for label, points in series.items():
        if points:
            _plot_cdf(ax, points, label=label, **dict((styles or {}).get(label, {})))
    for label, x in (marks or {}).items():
        ax.axvline(x, color="0.4", linestyle=":", linewidth=1)
        ax.annotate(label, (x, _Q_LO), xytext=(3, 3), textcoords="offset points", fontsize=8, color="0.3")
    _cdf_axes(ax, xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the streams scenario -------------------------------------------------------------------------------------


def streams_charts(json_path: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    out = {
        "memory": streams_memory(chart_path(json_path, "memory"), report),
        "lag-cdf": streams_lag_cdf(chart_path(json_path, "lag-cdf"), report),
    }
    if report.get("backpressure"):
        out["backpressure"] = streams_backpressure(chart_path(json_path, "backpressure"), report)
    return out


def _subtitle(report: Mapping[str, Any]) -> str:
    m = report["machine"]
    return f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {report['settings']['engine']} engine"


def streams_memory(path: Path, report: Mapping[str, Any]) -> Path:
    """Worker RSS (idle before, all streams open, fresh) and bytes per open stream, against concurrency."""
    plt = _pyplot()
    levels = report["levels"]
    held = [lv["gateway"]["max_open"] or lv["streams"] for lv in levels]

    def line(ax: Any, key: str, style: str, label: str, **kw: Any) -> None:
        xy = [(h, lv[key] / 1e6) for h, lv in zip(held, levels, strict=True) if lv.get(key)]  # missing: left out
        if xy:
            ax.plot(*zip(*xy, strict=True), style, label=label, **kw)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    line(left, "rss_open", "o-", "all streams open")
    line(left, "rss_peak", "^:", "peak", color="C0", alpha=0.6)
    line(left, "rss_idle", "s--", "idle before (warmed up)")
    line(left, "rss_fresh", "x:", "fresh worker, idle")
    left.axhline(400, color="C3", linestyle=":", linewidth=1)
    left.annotate("400 MB target at 10,000", (held[0], 400), xytext=(0, -10), textcoords="offset points", fontsize=8)
    left.set_xscale("log")
    left.set_xlabel("concurrent streams (most open at once)")
    left.set_ylabel("gateway worker RSS (MB)")
    left.set_title("worker memory")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    per = [lv["bytes_per_stream"] for lv in levels]
    right.plot([h for h, b in zip(held, per, strict=True) if b], [b / 1024 for b in per if b], "o-", color="C2")
    for h, b in zip(held, per, strict=True):
        if b:
            right.annotate(f"{b / 1024:.1f}", (h, b / 1024), xytext=(4, 4), textcoords="offset points", fontsize=8)
    right.set_xscale("log")
    right.margins(x=0.12)
    right.set_ylim(bottom=0)
    right.set_xlabel("concurrent streams (most open at once)")
    right.set_ylabel("KiB per open stream: (RSS open − idle) / streams")
    right.set_title("bytes per open stream")
    right.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"streams: one gateway worker — {_subtitle(report)}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_LAG_CURVES: dict[str, tuple[str, dict[str, Any]]] = {  # a level's run → its label and line style
    "gateway": ("via gateway", {}),
    "direct": ("direct", {"linestyle": "--", "alpha": 0.6}),
    "bare": ("via bare aiohttp", {"linestyle": ":"}),
    "nginx": ("via nginx", {"linestyle": "-."}),
}


def streams_lag_cdf(path: Path, report: Mapping[str, Any]) -> Path:
    """Per-event lag (receive − send) CDF per level: through the gateway (solid), direct (dashed), and at the
    level that has them, through the reference proxies (bare aiohttp dotted, nginx dash-dotted)."""
    series: dict[str, Points] = {}
    styles: dict[str, dict[str, Any]] = {}
    for i, lv in enumerate(report["levels"]):
        n = f"{lv['streams']:,}"
        runs = {"gateway": lv["gateway"], "direct": lv["direct"], **lv.get("refs", {})}
        for target, run in runs.items():
            name, style = _LAG_CURVES[target]
            label = f"{n} {name}"
            if run["window_s"] is None:
                label += " (all events: never all open at once)"
            series[label] = run["cdf_ms"]
            styles[label] = {"color": f"C{i}", **style}
    return latency_cdf(
        path,
        series,
        title=f"per-event lag with all streams open, per level\n{_subtitle(report)}",
        xlabel="event lag: client receive − upstream send (ms, log)",
        styles=styles,
    )


def streams_backpressure(path: Path, report: Mapping[str, Any]) -> Path:
    """The slow-reader test over time: worker RSS growth and bytes the upstream got out."""
    plt = _pyplot()
    bp = report["backpressure"]
    ts = [t for t, _, _ in bp["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    ax.plot(ts, [g / 2**20 for _, g, _ in bp["samples"]], "o-", markersize=3, label="worker RSS growth (MiB)")
    ax.plot(ts, [w / 2**20 for _, _, w in bp["samples"]], "s-", markersize=3, label="bytes the upstream sent (MiB)")
    ax.axvspan(0, bp["pause_s"], color="0.9", label="client not reading")
    ax.axhline(bp["pushed_bytes"] / 2**20, color="C3", linestyle=":", linewidth=1, label="stream size")
    ax.set_xlabel("seconds since the response head")
    ax.set_ylabel("MiB")
    ax.set_title(f"backpressure: a {bp['pushed_bytes'] // 2**20} MiB stream to a client that stops reading")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the overhead scenario ------------------------------------------------------------------------------------


def overhead_charts(json_path: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Non-stream latency CDF per target, from the (quantile, ms) points of every round's raw samples."""
    s = report["settings"]
    path = latency_cdf(
        chart_path(json_path, "latency-cdf"),
        report["cdf_ms"],
        title=(
            f"overhead: non-stream latency, open loop {s['rate']:g} req/s, {s['rounds']} round(s) × "
            f"{s['duration_s']:g} s\n{report['machine']['nproc']} CPUs ({report['machine']['cpu_model']}), "
            f"Python {report['machine']['python']}"
        ),
        xlabel="latency from the due time (ms, log)",
        styles={"direct": {"linestyle": "--"}},
    )
    return {"latency-cdf": path}


# -- the throughput scenario ----------------------------------------------------------------------------------


def throughput_charts(json_path: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    return {"throughput-p99": throughput_vs_p99(chart_path(json_path, "throughput-p99"), report)}


def throughput_vs_p99(path: Path, report: Mapping[str, Any]) -> Path:
    """Left: the open-loop sweep, p99 against the offered rate (✗: over the bound). Right: closed loop, p99
    against the req/s reached, one point per concurrency (median over rounds); unpinned targets dashed."""
    plt = _pyplot()
    bound = report["settings"]["p99_bound_ms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for i, (name, sw) in enumerate(report["sweep"].items()):
        last: dict[float, Mapping[str, Any]] = {st["rate"]: st for st in sw["steps"]}  # the retry, if any
        steps = [st for st in last.values() if st["p99"] is not None]
        left.plot([st["rate"] for st in steps], [st["p99"] for st in steps], "o-", color=f"C{i}", label=name, ms=4)
        over = [st for st in steps if not st["ok"]]
        left.plot([st["rate"] for st in over], [st["p99"] for st in over], "x", color=f"C{i}", ms=10, mew=2)
    left.axhline(bound, color="C3", linestyle=":", linewidth=1)
    left.annotate(f"p99 bound {bound:g} ms", (0.01, bound), xycoords=("axes fraction", "data"), fontsize=8)
    _plain_log_y(left)
    left.set_xlabel("offered rate, open loop (req/s)")
    left.set_ylabel("latency p99 (ms, log)")
    left.set_title("open-loop sweep (pinned; ✗: p99 over the bound)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    pinned = set(report["sweep"])
    for i, (name, rounds) in enumerate(report["closed"].items()):
        by_c: dict[int, list[tuple[float, float]]] = {}
        for results in rounds:
            for r in results:
                if r["p99"] is not None:
                    by_c.setdefault(r["concurrency"], []).append((r["rps"], r["p99"]))
        points = [(median([x for x, _ in v]), median([y for _, y in v])) for _, v in sorted(by_c.items())]
        style = "o-" if name in pinned else "s--"
        right.plot([x for x, _ in points], [y for _, y in points], style, color=f"C{i}", label=name, ms=4)
        for (x, y), c in zip(points, sorted(by_c), strict=True):
            right.annotate(f"c={c}", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, color="0.4")
    _plain_log_y(right)
    right.set_xlabel("requests per second reached, closed loop")
    right.set_ylabel("latency p99 (ms, log)")
    right.set_title("closed loop per concurrency (dashed: workers, unpinned)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"throughput vs p99 — {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plain_log_y(ax: Any) -> None:
    """A log y axis labelled 1, 2, 5, 10, 20, 50 … rather than 10⁰, 10¹."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


_CHARTS = {"streams": streams_charts, "overhead": overhead_charts, "throughput": throughput_charts}


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(
            "usage: python -m benchmarks.charts REPORT.json ...  (a `streams`, `overhead` or `throughput` report, "
            "from --json)",
            file=sys.stderr,
        )
        return 2
    for name in paths:
        report = json.loads(Path(name).read_text())
        draw = _CHARTS.get(report.get("scenario", ""))
        if draw is None or (report["scenario"] == "overhead" and "cdf_ms" not in report):
            print(f"{name}: no charts for scenario {report.get('scenario')!r}", file=sys.stderr)
            return 1
        for kind, path in draw(Path(name), report).items():
            print(f"chart ({kind}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

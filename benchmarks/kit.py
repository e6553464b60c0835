"""What the routing scenarios (hedging, failover, routing) share: fake upstreams with faults, gateways built
from a config, upstream counters, a scenario's header lines, its table, its PASS/FAIL lines and its report.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.fake_upstream import FIXTURES
from benchmarks.harness import CLK_TCK, CpuPlan, Service, ServiceError, cpu_ticks, get_json, http_ok, machine

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

GATEWAY_KEY = "sk-bench-0123456789"
MODEL = "fake/gpt-4o-mini"
UPSTREAM_MODEL = "gpt-4o-mini"
STREAM_FIXTURE = FIXTURES / "stream_ok.sse"
CHAT_PATH = "/v1/chat/completions"

# Response headers the gateway sets (proxy/forward.py), counted by the load generator.
PROVIDER_HEADER = "X-Hedgerow-Provider"
ATTEMPTS_HEADER = "X-Hedgerow-Attempts"
HEDGED_HEADER = "X-Hedgerow-Hedged"


class GatewayDown(ServiceError):
    """The gateway under test did not start (exit status 1, like `overhead`; other failures give 2)."""


@dataclass(frozen=True)
class Upstream:
    name: str  # also the provider's name in the gateway config, so X-Hedgerow-Provider names it
    port: int
    service: Service

    @property
    def provider(self) -> tuple[str, int]:
        return self.name, self.port

    def stats(self) -> dict[str, int]:
        return get_json(self.port, "/stats")


def start_upstream(name: str, port: int, args: Sequence[str], plan: CpuPlan, log_dir: Path) -> Upstream:
    service = Service(
        name, ["-m", "benchmarks.fake_upstream", "--port", str(port), *args], plan.load, log_dir
    )  # on the load generator's core(s): the gateway's core stays its own
    try:
        service.wait_ready(http_ok(port, "/stats"))
    except ServiceError:
        service.stop()
        raise
    return Upstream(name, port, service)


def gateway_config(
    port: int,
    providers: Sequence[tuple[str, int]],
    hedge: str | None = None,
    *,
    adapter: str = "openai",
    base_path: str = "/v1",
    upstream_model: str = UPSTREAM_MODEL,
) -> str:
    """One key, one provider per (name, upstream port), one model `fake/gpt-4o-mini` with an endpoint on
    each. `hedge` is the model's `hedge:` mapping in YAML flow style (None: the defaults). `adapter`,
    `base_path` (of the base-url) and `upstream_model` for providers of another wire format (e.g. gemini,
    "/v1beta", "gemini-2.5-flash")."""
    wire = "" if adapter == "openai" else f", adapter: {adapter}"
    lines = "\n".join(
        f'  - {{name: {name}{wire}, base-url: "http://127.0.0.1:{up}{base_path}"}}' for name, up in providers
    )
    endpoints = ", ".join(f"{{provider: {name}, model: {upstream_model}}}" for name, _ in providers)
    text = (
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"keys:\n  - {{name: bench, key: {GATEWAY_KEY}}}\n"
        f"providers:\n{lines}\n"
        f"models:\n  - name: {MODEL}\n    endpoints: [{endpoints}]\n"
    )
    if hedge is not None:
        text += f"    hedge: {hedge}\n"
    return text


def start_gateway(name: str, port: int, config: str, plan: CpuPlan, log_dir: Path) -> Service:
    path = log_dir / f"{name}.yaml"
    if "\naccounting:" not in "\n" + config:  # the ledger goes with the run's logs, not into the repo
        config += f'accounting: {{store: {{path: "{log_dir / (name + ".db")}"}}}}\n'
    path.write_text(config)
    service = Service(name, ["-m", "proxy", "serve", "--config", str(path), "--workers", "1"], plan.proxy, log_dir)
    try:
        service.wait_ready(http_ok(port, "/readyz"), timeout_s=30)
    except ServiceError as e:
        service.stop()
        raise GatewayDown(str(e)) from None
    return service


def endpoint_snapshot(port: int) -> list[dict[str, Any]]:
    """The gateway's own view of each endpoint (GET /api/v1/endpoints): ejection, TTFB quantiles …"""
    return get_json(port, "/api/v1/endpoints", key=GATEWAY_KEY)["data"]


def load_args(
    port: int,
    *,
    mode: str = "open",
    rate: float = 50.0,
    duration: float = 1.0,
    stream: bool = False,
    concurrency: int = 1,
    count_headers: Sequence[str] = (),
    over_ms: Sequence[float] = (),
) -> list[str]:
    args = ["--url", f"http://127.0.0.1:{port}{CHAT_PATH}", "--model", MODEL, "--key", GATEWAY_KEY]
    args += ["--mode", mode, "--duration", f"{duration:g}"]
    if mode == "open":
        args += ["--rate", f"{rate:g}"]
    else:
        args += ["--concurrency", str(concurrency)]
    if stream:
        args += ["--stream", "--expect", str(STREAM_FIXTURE)]
    for h in count_headers:
        args += ["--count-header", h]
    for ms in over_ms:
        args += ["--count-over-ms", f"{ms:g}"]
    return args


def stats_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


@contextmanager
def orchestrator_on(plan: CpuPlan) -> Iterator[None]:
    """Keep this process (and the threads it starts) off the gateway's core while a scenario runs."""
    own = os.sched_getaffinity(0)
    if plan.load is not None:
        os.sched_setaffinity(0, plan.load)
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


@contextmanager
def gateway_cpu(plan: CpuPlan, gateway: Service) -> Iterator[dict[str, float | None]]:
    """Over the block: the gateway's CPU seconds, and the busy share of its core that was not the gateway
    (other tenants, kernel network work charged to no process), as `overhead` reports it."""
    out: dict[str, float | None] = {"gateway_cpu_s": None, "gateway_user_s": None, "other_load_pct": None}
    user_before, sys_before = gateway.cpu_times()
    core_before = cpu_ticks(plan.proxy) if plan.proxy is not None else None
    yield out
    user_after, sys_after = gateway.cpu_times()
    cpu_s = user_after + sys_after - user_before - sys_before
    out["gateway_cpu_s"] = round(cpu_s, 3)
    out["gateway_user_s"] = round(user_after - user_before, 3)
    if core_before is not None and plan.proxy is not None:
        busy, total = (now - then for now, then in zip(cpu_ticks(plan.proxy), core_before, strict=True))
        out["other_load_pct"] = round(100 * max(0.0, busy - cpu_s * CLK_TCK) / total, 1) if total else None


def startup_failed(e: ServiceError) -> int:
    """A scenario's exit status when a process it needs did not start: 1 for the gateway (what is measured),
    2 for anything else (an upstream, the bare proxy, the load generator), with the reason on stderr."""
    if isinstance(e, GatewayDown):
        print(f"error: gateway did not start:\n{e}", file=sys.stderr)
        return 1
    print(f"error: {e}", file=sys.stderr)
    return 2


def banner(name: str, settings: str, plan: CpuPlan) -> dict[str, Any]:
    host = machine()
    print(
        f"{name}: {settings}\nmachine: {host['nproc']} CPUs ({host['cpu_model']}), Linux {host['kernel']}, "
        f"Python {host['python']}\npinning: {plan.describe()}\n",
        flush=True,
    )
    return host


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# -- formatting ------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b is not None and b > 0 else None


def pct(part: float | None, whole: float | None, digits: int = 2) -> float | None:
    return round(100 * part / whole, digits) if part is not None and whole else None


def table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], label_width: int = 40) -> str:
    """Rows of preformatted cells under column heads; a row with no cells is a section title."""
    width = max([12, *(len(c) + 2 for c in columns), *(len(cell) + 2 for _, cells in rows for cell in cells)])
    head = f"{'':<{label_width}}" + "".join(f"{c:>{width}}" for c in columns)
    lines = [head, "-" * len(head)]
    for label, cells in rows:
        lines.append(f"{label:<{label_width}}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def check(name: str, kind: str, ok: bool | None, detail: str) -> dict[str, Any]:
    """kind: "performance" (a target; not enforced with --quick) or "correctness" (always enforced)."""
    return {"name": name, "kind": kind, "ok": ok, "detail": detail}


def verdicts(checks: Sequence[dict[str, Any]], quick: bool) -> str:
    lines = ["", "acceptance:"]
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["ok"]]
        note = " (not enforced with --quick)" if quick and c["kind"] == "performance" else ""
        lines.append(f"  {verdict}  {c['name']}: {c['detail']}{note}")
    return "\n".join(lines)


def exit_status(checks: Sequence[dict[str, Any]], quick: bool) -> int:
    enforced = [c for c in checks if not quick or c["kind"] == "correctness"]
    return 0 if all(c["ok"] for c in enforced) else 1


def write_report(opts: Options, report: dict[str, Any]) -> None:
    if opts.json_path is not None:
        opts.json_path.write_text(json.dumps(report, indent=2) + "\n")

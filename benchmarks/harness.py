"""The harness under every scenario: ports, CPU pinning, server processes, load-generator runs, host facts.

Each server runs in a process group of its own, so `stop()` ends exactly what was started (workers a
gateway forks included) and CPU time can be summed over the group, to tell which process was the bottleneck.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServiceError(RuntimeError):
    """A server did not start, or the load generator failed."""


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env() -> dict[str, str]:
    # Loopback only: an inherited HTTP proxy setting must not reroute any child's traffic.
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@dataclass(frozen=True)
class CpuPlan:
    """The proxy under test gets a core to itself; the load generator, the fake upstream and this
    orchestrator share the rest. Bare and gateway get the same core, so the comparison is fair."""

    load: frozenset[int] | None
    proxy: frozenset[int] | None

    def describe(self) -> str:
        if self.load is None or self.proxy is None:
            return "no pinning (fewer than 2 CPUs available)"
        return (
            f"proxy under test on CPU {_cpus(self.proxy)}; "
            f"load generator, fake upstream and orchestrator on CPU {_cpus(self.load)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def cpu_plan() -> CpuPlan:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return CpuPlan(None, None)
    return CpuPlan(load=frozenset(cpus[:-1]), proxy=frozenset(cpus[-1:]))


def _pinner(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    # Pinned before exec, so every thread and forked worker inherits it from the start.
    return None if cpus is None else lambda: os.sched_setaffinity(0, cpus)


def http_ok(port: int, path: str) -> Callable[[], bool]:
    """A readiness probe: GET 127.0.0.1:port/path answers 200 (http.client ignores proxy env vars)."""

    def probe() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    return probe


def get_json(port: int, path: str, key: str | None = None, timeout_s: float = 2.0) -> Any:
    """GET 127.0.0.1:port/path as JSON (a fake upstream's /stats, a gateway's endpoint snapshot)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise ServiceError(f"GET :{port}{path} answered {resp.status}: {body[:200]!r}")
        return json.loads(body)
    except (OSError, http.client.HTTPException) as e:
        raise ServiceError(f"GET :{port}{path} failed: {e}") from None
    finally:
        conn.close()


class Service:
    """A server process `sys.executable <args>` (or `exe <args>`: another program, e.g. nginx), run from the
    repo root with output to `log_dir/<name>.log`."""

    def __init__(
        self, name: str, args: list[str], cpus: frozenset[int] | None, log_dir: Path, exe: str | None = None
    ) -> None:
        self.name = name
        self._log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self._log_path.open("wb")
        self.proc = subprocess.Popen(
            [exe or sys.executable, *args],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pinner(cpus),
        )

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if probe():
                return
            time.sleep(0.05)
        raise ServiceError(f"{self.name} not ready after {timeout_s:g}s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in this service's session."""
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of every live process in this service's session."""
        user = system = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()  # fields[0] is stat(5) field 3, "state"
            if int(fields[3]) == self.proc.pid:  # field 6: session id
                user += int(fields[11])  # field 14: utime
                system += int(fields[12])  # field 15: stime
        return user / CLK_TCK, system / CLK_TCK

    def cpu_by_pid(self) -> dict[int, float]:
        """User + system CPU seconds of each live process in this service's session (a supervisor and the
        workers it forked: how the work was spread over them)."""
        out: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[3]) == self.proc.pid:  # field 6: session id
                out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        return out

    def log_tail(self, lines: int = 25) -> str:
        self._log.flush()
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)  # whatever of the group is left, stray workers included
        self.proc.wait(timeout=5)
        self._log.close()

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def cpu_ticks(cpus: frozenset[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of these CPUs since boot, from /proc/stat. Steal counts as busy: time the
    hypervisor gave to someone else is interference just like another process."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])
            busy += user + nice + system + irq + softirq + steal
            total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def run_load(
    args: list[str], cpus: frozenset[int] | None, timeout_s: float, module: str = "benchmarks.load"
) -> dict[str, Any]:
    """One `python -m benchmarks.load` run in a fresh, pinned process; its JSON result. `module`: another
    entry point that runs load.py's code (e.g. `benchmarks.throughput load`, which adds request headers)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", *module.split(), *args],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            timeout=timeout_s,
            preexec_fn=_pinner(cpus),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ServiceError(f"load generator still running after {timeout_s:g}s; killed") from None
    if out.returncode != 0:
        raise ServiceError(f"load generator failed ({out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(out.stdout)


def run_load_sampled(
    args: list[str], cpus: frozenset[int] | None, timeout_s: float, sample: Callable[[], Any], every_s: float
) -> tuple[dict[str, Any], list[tuple[float, Any]]]:
    """`run_load`, calling `sample()` every `every_s` meanwhile (and once more at the end); the samples come
    with their time.monotonic(), which is the generator's clock too (both CLOCK_MONOTONIC), so they line up
    with the result's `t0_monotonic_s`. Bounded: the load generator run has its own timeout."""
    samples: list[tuple[float, Any]] = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_load, args, cpus, timeout_s)
        while True:
            samples.append((time.monotonic(), sample()))
            try:
                result = future.result(timeout=every_s)
                break
            except TimeoutError:
                continue
    samples.append((time.monotonic(), sample()))
    return result, samples


def listeners(port: int) -> int:
    """How many sockets listen on this TCP port (IPv4), from /proc/net/tcp: with SO_REUSEPORT, one per
    worker, so a gateway started with `--workers N` is all there once this is N."""
    suffix = f":{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(suffix) and fields[3] == "0A":  # local address, state LISTEN
            count += 1
    return count


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


_NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream fake {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
NGINX_MISSING = "nginx: not on PATH, skipped (apt-get install nginx, or any nginx ≥ 1.19.5: benchmarks/README.md)"


def nginx_service(tmp: Path, cpus: frozenset[int] | None, upstream_port: int, port: int) -> Service | None:
    """nginx as a reference proxy (one worker, keep-alive upstream, no buffering) on `port`, started (not yet
    ready), when `nginx` is on PATH; else None. Its files live under `tmp/nginx`."""
    exe = shutil.which("nginx")
    if exe is None:
        return None
    prefix = tmp / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=prefix, upstream=upstream_port, port=port))
    args = ["-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), "-g", "daemon off;"]
    return Service("nginx", args, cpus, tmp, exe=exe)


def bench_engine() -> str:
    """The gateway's server engine in a scenario: `HEDGEROW_BENCH_ENGINE` (`lean` or `aiohttp`), else the config's
    default."""
    from proxy.config import ServerConfig

    return os.environ.get("HEDGEROW_BENCH_ENGINE") or ServerConfig().engine

"""How many CPUs this process may really use: `server.workers: auto` starts one worker per CPU.

`os.cpu_count()` counts the host's CPUs; in a container or a pod with a CPU limit, or under `taskset`, far
fewer are ours. This takes the smallest of the affinity mask and the cgroup's CPU quota (cgroup v2
`cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), a fractional quota rounded up, as Go's automaxprocs
and .NET do: a 1.5-CPU limit runs two workers, each of which may then be throttled for half of its time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs in this process's affinity mask, capped by its cgroup's CPU quota; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota in CPUs (quota / period), or None when there is none or it cannot be read."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "150000 100000"
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 means no limit
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None

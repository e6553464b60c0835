"""`workers: auto` counts the CPUs a process may use: the affinity mask, capped by a cgroup CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.cpus import cgroup_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: int, period: int) -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(
    ("text", "quota"), [("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000", 0.5), ("junk", None)]
)
def test_cgroup_v2_quota(tmp_path, text, quota):
    assert cgroup_quota(_v2(tmp_path, text)) == quota


@pytest.mark.parametrize(("quota_us", "period_us", "quota"), [(-1, 100000, None), (300000, 100000, 3.0)])
def test_cgroup_v1_quota(tmp_path, quota_us, period_us, quota):
    assert cgroup_quota(_v1(tmp_path, quota_us, period_us)) == quota


def test_no_cgroup_files_is_no_quota_and_the_affinity_mask_counts(tmp_path):
    assert cgroup_quota(tmp_path) is None
    assert usable_cpus(tmp_path) == AFFINITY


def test_a_fractional_quota_rounds_up_and_never_exceeds_the_affinity_mask(tmp_path):
    assert usable_cpus(_v2(tmp_path, "50000 100000")) == 1  # half a CPU still needs one worker
    assert usable_cpus(_v2(tmp_path, "150000 100000")) == min(2, AFFINITY)
    assert usable_cpus(_v2(tmp_path, f"{(AFFINITY + 8) * 100000} 100000")) == AFFINITY

"""The cores an engine may use in a container limited by CPU quota rather than by CPU set: its affinity still lists
every host core, and a thread per host core would stall on the quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fos_runtime import cores

V2 = [("/", "cg", "cgroup2", "rw")]  # (mount root, mount point under tmp_path, fstype, super options)

# (/proc/self/cgroup, mounts, the cgroup files there, the quota found, the cores of an 8-core affinity)
CASES = {
    # docker run --cpus 2.5: the container's own cgroup is its root (cgroup namespace).
    "v2 quota, rounded down": ("0::/\n", V2, {"cg/cpu.max": "250000 100000\n"}, 2.5, 2),
    "v2 without quota": ("0::/\n", V2, {"cg/cpu.max": "max 100000\n"}, None, 8),
    # Kubernetes without a cgroup namespace: the pod's limit sits on a cgroup above the container's.
    "a parent's quota, the least wins": (
        "0::/kubepods/pod1/c1\n",
        V2,
        {
            "cg/kubepods/pod1/c1/cpu.max": "max 100000\n",
            "cg/kubepods/pod1/cpu.max": "300000 100000\n",
            "cg/cpu.max": "max 100000\n",
        },
        3.0,
        3,
    ),
    # Docker on cgroup v1: the cpu controller's mount shows the container's cgroup as its root; the memory
    # controller's folder is not read.
    "v1 under a mount rooted at the container, one core at least": (
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        [("/docker/abc", "cpu", "cgroup", "rw,cpu,cpuacct"), ("/docker/abc", "memory", "cgroup", "rw,memory")],
        {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n", "memory/cpu.cfs_quota_us": "100\n"},
        0.5,
        1,
    ),
    "v1 without quota": (
        "4:cpu:/\n",
        [("/", "cpu", "cgroup", "rw,cpu")],
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        None,
        8,
    ),
    # Mounted from /a, the folder holds /a's cgroups: /ab (a name that only begins like it) is not there, and the
    # folder "ab" under the mount point would be /a/ab, another cgroup.
    "a cgroup outside the mount's root": (
        "0::/ab\n",
        [("/a", "cg", "cgroup2", "rw")],
        {"cg/ab/cpu.max": "200000 100000\n", "cg/cpu.max": "100000 100000\n"},
        None,
        8,
    ),
    "garbled files": ("what\n0::\n", [], {}, None, 8),
}


@pytest.mark.parametrize("case", CASES)
def test_the_cores_follow_the_cpu_quota(tmp_path, monkeypatch, case):
    cgroup, mounts, files, quota, usable = CASES[case]
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [
        f"{30 + k} 25 0:{26 + k} {root} {tmp_path / point} rw,nosuid - {fstype} {fstype} {options}"
        for k, (root, point, fstype, options) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(["22 1 8:1 / / rw - ext4 /dev/vda rw", "1 2", *lines]) + "\n")
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    assert cores.cpu_quota(proc) == quota
    assert cores.available_cores(proc) == usable


def test_no_proc_no_quota():
    assert cores.cpu_quota(Path("/nonexistent")) is None  # not Linux, or /proc unreadable: no quota known

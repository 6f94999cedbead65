"""The cores an engine may use in a container limited by CPU quota rather than by CPU set: its affinity still lists
every host core, and a thread per host core would stall on the quota."""

from __future__ import annotations

import os

import pytest

from fos_runtime import cores


def machine(tmp_path, cgroup: str, mounts: list[tuple[str, str, str, str]], quotas: dict[str, str]):
    """A fake /proc/self (``cgroup``; ``mounts``: (root, mount point under tmp_path, fstype, super options)) and the
    cgroup files ``quotas`` names (a path under tmp_path -> its content)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [
        f"{30 + k} 25 0:{26 + k} {root} {tmp_path / point} rw,nosuid - {fstype} {fstype} {options}"
        for k, (root, point, fstype, options) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(["22 1 8:1 / / rw - ext4 /dev/vda rw", *lines]) + "\n")
    for path, content in quotas.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    return proc


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)


def test_a_cgroup_v2_quota_cuts_the_cores_to_it_rounded_down(tmp_path, eight_cores):
    # docker run --cpus 2.5 on a host of 8: the container's own cgroup is its root (cgroup namespace).
    proc = machine(tmp_path, "0::/\n", [("/", "cg", "cgroup2", "rw")], {"cg/cpu.max": "250000 100000\n"})
    assert cores.cpu_quota(proc) == 2.5
    assert cores.available_cores(proc) == 2


def test_no_quota_leaves_every_core_of_the_affinity(tmp_path, eight_cores):
    proc = machine(tmp_path, "0::/\n", [("/", "cg", "cgroup2", "rw")], {"cg/cpu.max": "max 100000\n"})
    assert cores.cpu_quota(proc) is None
    assert cores.available_cores(proc) == 8
    assert cores.cpu_quota(tmp_path / "nothing") is None  # not Linux, or /proc unreadable: no quota known
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "cgroup").write_text("what\n0::\n")
    (garbled / "mountinfo").write_text("1 2\n")
    assert cores.cpu_quota(garbled) is None


def test_a_parents_quota_counts_and_the_least_wins(tmp_path, eight_cores):
    # Kubernetes without a cgroup namespace: the pod's limit sits on a cgroup above the container's.
    proc = machine(
        tmp_path,
        "0::/kubepods/pod1/c1\n",
        [("/", "cg", "cgroup2", "rw")],
        {
            "cg/kubepods/pod1/c1/cpu.max": "max 100000\n",
            "cg/kubepods/pod1/cpu.max": "300000 100000\n",
            "cg/cpu.max": "max 100000\n",
        },
    )
    assert cores.cpu_quota(proc) == 3.0
    assert cores.available_cores(proc) == 3


def test_a_cgroup_v1_quota_under_a_mount_rooted_at_the_container_gives_one_core_at_least(tmp_path, eight_cores):
    # Docker on cgroup v1: the cpu controller's mount shows the container's cgroup as its root.
    proc = machine(
        tmp_path,
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        [("/docker/abc", "cpu", "cgroup", "rw,cpu,cpuacct"), ("/docker/abc", "memory", "cgroup", "rw,memory")],
        {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n", "memory/cpu.cfs_quota_us": "100\n"},
    )
    assert cores.cpu_quota(proc) == 0.5  # the memory controller's folder is not read
    assert cores.available_cores(proc) == 1
    unlimited = tmp_path / "unlimited"
    unlimited.mkdir()
    proc = machine(
        unlimited,
        "4:cpu:/\n",
        [("/", "cpu", "cgroup", "rw,cpu")],
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
    )
    assert cores.cpu_quota(proc) is None


def test_a_cgroup_outside_the_mounts_root_is_not_read_through_it(tmp_path, eight_cores):
    # Mounted from /a, the folder holds /a's cgroups: /ab (a name that only begins like it) is not there, and the
    # folder "ab" under the mount point would be /a/ab, another cgroup.
    proc = machine(
        tmp_path,
        "0::/ab\n",
        [("/a", "cg", "cgroup2", "rw")],
        {"cg/ab/cpu.max": "200000 100000\n", "cg/cpu.max": "100000 100000\n"},
    )
    assert cores.cpu_quota(proc) is None

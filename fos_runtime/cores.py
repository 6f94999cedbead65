"""How many cores this process may use: the CPUs it may run on, and no more than its cgroup's CPU quota allows.

A container limited by quota rather than by a CPU set (``docker run --cpus 4``, a Kubernetes ``limits.cpu``) still
sees every core of the host in its affinity. An engine that started a thread per host core there would run, say, 64
threads on 4 cores' worth of time: the kernel stops the whole group each period once the quota is spent, and each
layer's threads wait for the one that was stopped. Quotas are read from cgroup v2 (``cpu.max``) or v1
(``cpu.cfs_quota_us``), the process's own cgroup and each one above it, as mounted (``/proc/self/mountinfo``).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path


def affinity() -> int | None:
    """The CPUs this process may run on; None where the system does not say (not Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return None


def available_cores(proc: Path = Path("/proc/self")) -> int:
    """The CPUs this process may run on, cut to its CPU quota rounded down (one at least)."""
    cores = affinity()
    if cores is None:
        return os.cpu_count() or 1
    quota = cpu_quota(proc)
    return max(1, min(cores, math.floor(quota))) if quota is not None else cores


@functools.lru_cache(maxsize=8)  # read once: a CPU plan is asked for on every Triton round
def cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """The least CPU quota, in cores, over this process's cgroup and those above it; None where none is set or
    none can be read."""
    try:
        mounts = (proc / "mountinfo").read_text(encoding="utf-8").splitlines()
        groups = (proc / "cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    limits = [q for folder in _cgroup_folders(mounts, groups) for q in _quotas(folder)]
    return min(limits) if limits else None


def _cgroup_folders(mounts: list[str], groups: list[str]) -> list[tuple[Path, Path, int]]:
    """(the process's cgroup folder, its mount point, cgroup version) for the v2 hierarchy and v1's cpu controller."""
    paths: dict[int, str] = {}
    for line in groups:  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if not path:
            continue
        if not controllers:
            paths[2] = path
        elif "cpu" in controllers.split(","):
            paths[1] = path
    found = []
    for line in mounts:  # "id parent dev root mount-point options [optional...] - fstype source super-options"
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        root, point = fields[3], Path(fields[4])
        version = 2 if rest[0] == "cgroup2" else 1 if rest[0] == "cgroup" and "cpu" in rest[2].split(",") else 0
        if version not in paths:
            continue
        path = paths[version]
        # The mount shows the hierarchy from its root down (a container's cgroup, mounted as its root without a cgroup
        # namespace): a cgroup outside that root is not under this mount point at all.
        if not (path == root or path.startswith(root.rstrip("/") + "/")):
            continue
        relative = os.path.relpath(path, root)
        folder = point / relative if relative != "." else point
        found.append((folder, point, version))
    return found


def _quotas(entry: tuple[Path, Path, int]) -> list[float]:
    """The quotas set on the cgroup folder and each folder above it, up to the mount point."""
    folder, point, version = entry
    quotas = []
    while True:
        quota = _quota(folder, version)
        if quota is not None:
            quotas.append(quota)
        if folder == point or point not in folder.parents:
            return quotas
        folder = folder.parent


def _quota(folder: Path, version: int) -> float | None:
    try:
        if version == 2:
            limit, _, period = (folder / "cpu.max").read_text().partition(" ")
            return None if limit == "max" else int(limit) / int(period)
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None

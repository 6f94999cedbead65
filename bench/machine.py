"""What a figure was measured on, written beside it: the CPU's model and the flags that decide which kernels run,
the cores this process may use (its affinity and cgroup quota), and the engines' versions. Machines here vary from
session to session, and a figure is only comparable within one of them."""

from __future__ import annotations

import importlib.metadata
import os
import platform

from fos_runtime import cores, engines

PACKAGES = ("onnxruntime", "onnxruntime-gpu", "openvino", "torch", "transformers", "sentence-transformers")


def describe() -> dict:
    flags, model = engines.cpuinfo()
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu_model": model or platform.processor(),
        # The instruction sets the engines pick their kernels by (AVX2, AVX-512 and its VNNI / BF16, AMX).
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": cores.affinity(),
        "cpu_quota": cores.cpu_quota(),
        "available_cores": cores.available_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def summary(machine: dict) -> str:
    """One line for a log: model, cores, the AVX-512 / AMX flags."""
    flags = machine["cpu_flags"]
    wide = [f for f in flags if f.startswith(("avx512", "amx"))] or [f for f in flags if f == "avx2"]
    quota = f", quota {machine['cpu_quota']:g}" if machine["cpu_quota"] is not None else ""
    return f"{machine['cpu_model'] or 'unknown CPU'}, {machine['available_cores']} cores{quota}; {' '.join(wide) or 'no AVX2'}"

"""``fos triton``: run the tritonserver binary that ships in the ``nvidia-pytriton`` wheel.

That build has the Python backend only (export with ``--encoder-backend python``) and runs on the
CPU, on Linux x86-64 or aarch64; Docker users run the NGC container instead (compose.yaml).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SYSTEM_BIN_DIRS = ("/usr/bin", "/usr/local/bin")


def _dist() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit("the nvidia-pytriton wheel is not installed: uv sync --extra triton") from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backends(workdir: Path) -> Path:
    """A backend directory whose Python backend stub matches this interpreter's version.

    The wheel ships one stub per Python version and expects it copied next to the backend
    library, as pytriton itself does at start-up.
    """
    dist = _dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"nvidia-pytriton has no Python backend stub for Python {version}")
    python_dir = workdir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (dist / "backends" / "python").iterdir():
        target = python_dir / item.name
        if not target.exists():
            target.symlink_to(item)
    target = python_dir / "triton_python_backend_stub"
    if not (target.exists() and target.stat().st_size == stub.stat().st_size):  # a running server may hold it
        shutil.copy(stub, target)
    return workdir / "backends"


def command(repository: Path, backends: Path, http_port: int, grpc_port: int, metrics_port: int) -> list[str]:
    return [
        str(_dist() / "bin" / "tritonserver"),
        f"--model-repository={Path(repository).resolve()}",
        f"--backend-directory={backends}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--log-verbose=0",
        "--exit-timeout-secs=10",
    ]


def environment() -> dict[str, str]:
    """The stub runs on the system libpython: let it import this environment's packages."""
    env = dict(os.environ)
    # The stub's embedded interpreter finds its standard library through the first `python3` on
    # PATH. It links the system libpython, so that must be the system's Python, not a pyenv or
    # virtual-environment build of another patch release (whose C modules then fail to import).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system_python = shutil.which(version, path=os.pathsep.join(SYSTEM_BIN_DIRS))
    if system_python:
        env["PATH"] = os.pathsep.join([str(Path(system_python).parent), env.get("PATH", "")])
    env.pop("VIRTUAL_ENV", None)
    # An explicit PYTHONPATH goes first, as it does for Python itself: it can give the stub packages of the
    # versions it was built for (nvidia-pytriton 0.7.0's stub returns empty outputs with numpy 2).
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), site) if p)
    # The copied stub no longer finds the wheel's bundled libraries through its relative RPATH.
    libs = str(_dist().parent.parent / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def start(repository: Path, workdir: Path, http_port: int, grpc_port: int, metrics_port: int, **popen) -> subprocess.Popen:
    backends = prepare_backends(workdir)
    return subprocess.Popen(command(repository, backends, http_port, grpc_port, metrics_port), env=environment(), **popen)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fos-triton-") as tmp:
        proc = start(args.repository, Path(tmp), args.http_port, args.grpc_port, args.metrics_port)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait()

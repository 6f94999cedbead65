"""``fos triton``: run the tritonserver binary that ships in the ``nvidia-pytriton`` wheel.

That build has the Python backend only (export with ``--encoder-backend python``) and runs on the
CPU, on Linux x86-64 or aarch64; Docker users run the NGC container instead (compose.yaml).

``fos triton`` supervises it: each Python model runs in a ``triton_python_backend_stub`` process,
a child of tritonserver holding its model in memory, and a busy stub outlives a tritonserver that
dies hard (the OOM killer's SIGKILL) for as long as nobody kills it. tritonserver therefore runs
in a process group of its own, and whenever it exits, whatever is left of that group goes too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from fos_runtime import workdirs

from .repository import parse

SYSTEM_BIN_DIRS = ("/usr/bin", "/usr/local/bin")
STUB_WATCH_S = 1.0  # how often fos triton looks for a stub that died


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


def command(repository: Path, backends: Path, http_port: int, grpc_port: int, metrics_port: int, shm_prefix: str) -> list[str]:
    return [
        str(_dist() / "bin" / "tritonserver"),
        f"--model-repository={Path(repository).resolve()}",
        f"--backend-directory={backends}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--log-verbose=0",
        "--exit-timeout-secs=10",
        # The stubs' shared memory lives in /dev/shm under this prefix; it is removed on exit.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
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


class Process(NamedTuple):
    pid: int
    ppid: int
    pgid: int


def processes() -> list[Process]:
    """The live processes (zombies left out: they hold nothing but their exit status)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:  # "pid (comm) state ppid pgrp ...", where comm may hold spaces and parentheses
                state, ppid, pgid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):  # gone meanwhile
                continue
            if state != "Z":
                found.append(Process(int(entry), int(ppid), int(pgid)))
    return found


def group_members(pgid: int) -> list[int]:
    return [p.pid for p in processes() if p.pgid == pgid]


class Triton:
    """tritonserver and its Python backend stubs, in a process group that ends as one."""

    def __init__(self, repository: Path, workdir: Path, http_port: int, grpc_port: int, metrics_port: int, **popen):
        backends = prepare_backends(workdir)
        self.http_port = http_port
        self.shm_prefix = f"fos_triton_{uuid.uuid4().hex[:12]}_"
        self.proc = subprocess.Popen(
            command(repository, backends, http_port, grpc_port, metrics_port, self.shm_prefix),
            env=environment(),
            # A process group of its own, which its stubs inherit. Not a session of its own: that group
            # would be orphaned, and the kernel wakes a stopped orphaned group (SIGCONT) whenever a
            # member exits, such as a stub giving up on a tritonserver that stopped answering.
            process_group=0,
            **popen,
        )

    def watch_stubs(self, stopping: Callable[[], bool], every_s: float = STUB_WATCH_S) -> int | None:
        """Wait for tritonserver to end. A Python stub that dies once it is ready (the OOM killer picks the process
        that holds a model) is not started again since Triton 24.06, and its model fails every request while Triton's
        readiness says ready: then tritonserver is stopped too, and that stub's pid is returned. (While models load,
        stubs come and go: the Python backend asks one for a model's config, then starts its instances.)"""
        seen: set[int] | None = None  # the stubs of a ready tritonserver
        while self.proc.poll() is None:
            if seen is None and self._ready():
                seen = set()
            if seen is not None:
                stubs = {pid for pid in group_members(self.proc.pid) if pid != self.proc.pid}
                gone = seen - stubs
                if gone and not stopping() and self.proc.poll() is None:
                    self.proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):  # a dead stub can hold its exit (stop() kills)
                        self.proc.wait(timeout=30)
                    return min(gone)
                seen |= stubs
            time.sleep(every_s)
        return None

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:  # refused while it starts, or a 503 (HTTPError) while models load
            return False

    def stop(self) -> int:
        """Kill tritonserver if it still runs, then every process left in its group, and remove their
        shared memory. Returns tritonserver's exit status."""
        self.proc.kill()
        code = self.proc.wait()
        # tritonserver is gone: its stubs have nobody left to serve, and one that is busy ignores SIGTERM.
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-pgid, os.WNOHANG)[0]:  # the stubs are our children if we are their reaper
                    pass
            time.sleep(0.02)
        for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
            region.unlink(missing_ok=True)
        return code


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
REPEATED_SIGNAL_S = 1.0  # a second stop signal within this is the first one again (uv run passes Ctrl-C on)


def foreign_backends(repository: Path) -> dict[str, str]:
    """The models in ``repository`` whose backend this build lacks (it has the Python backend only), by name: what
    ``fos serve --model`` and a default ``fos export`` write for the container's ONNX Runtime backend. tritonserver
    would stop at them with "unable to find backend library"."""
    found: dict[str, str] = {}
    for path in sorted(Path(repository).glob("*/config.pbtxt")):
        config = parse(path.read_text(encoding="utf-8"))
        # A hand-written config may name its backend by platform alone (onnxruntime_onnx, tensorrt_plan).
        backend = config.backend or ("" if config.platform == "ensemble" else config.platform)
        if backend and backend != "python":
            found[path.parent.name] = backend
    return found


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)


WORKDIR_PREFIX = "fos-triton-"  # then the pid of the fos triton that made it (fos_runtime.workdirs)


def run(args: argparse.Namespace) -> int:
    foreign = foreign_backends(args.repository)
    if foreign:
        listed = ", ".join(f"{name} ({backend})" for name, backend in foreign.items())
        print(
            f"fos triton: {args.repository} holds models for backends this tritonserver lacks (it has the Python "
            f"backend only): {listed}. Export them with --encoder-backend python into a repository of their own "
            "(fos export ... --encoder-backend python --repository triton_repository; fos triton --repository "
            "triton_repository), or serve this one with the NGC container (compose.yaml).",
            file=sys.stderr,
        )
        return 2
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # Linux, as the wheel's tritonserver
    # Stubs orphaned by a dead tritonserver become our children, to be reaped rather than left to
    # an init that may not reap (a container's).
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    with workdirs.fresh(WORKDIR_PREFIX) as tmp:
        # In tritonserver before it runs: should `fos triton` itself be killed, tritonserver gets a
        # SIGTERM and stops cleanly, its stubs with it.
        def stop_with_parent() -> None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

        server = Triton(
            args.repository, Path(tmp), args.http_port, args.grpc_port, args.metrics_port, preexec_fn=stop_with_parent
        )
        first: list[float] = []

        def stop(signum: int, _frame) -> None:
            # tritonserver has a process group of its own: a terminal's Ctrl-C reaches only us. The first
            # signal lets it unload its models (--exit-timeout-secs); a second one kills it, unless it comes
            # within a second: under `uv run`, one Ctrl-C reaches us twice (from the terminal, and from uv).
            if not first:
                first.append(time.monotonic())
                server.proc.terminate()
            elif time.monotonic() - first[0] > REPEATED_SIGNAL_S:
                server.proc.kill()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        dead = server.watch_stubs(stopping=lambda: bool(first))
        code = server.stop()
    if dead is not None:
        print(
            f"fos triton: a Python backend stub (pid {dead}) died, and tritonserver does not start it again: its "
            "model failed every request while Triton said it was ready. tritonserver was stopped, so that whatever "
            "runs fos triton starts it again whole (compose's restart policy, systemd's Restart=)",
            file=sys.stderr,
        )
        return code if code > 0 else 1
    if code < 0:
        print(
            f"fos triton: tritonserver was killed by {signal.Signals(-code).name}; its Python stubs are stopped", file=sys.stderr
        )
        return 128 - code
    return code

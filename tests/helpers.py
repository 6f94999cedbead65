"""What tests share besides fixtures: served names, ports, waiting, padded encoder inputs, a uvicorn thread and a
real tritonserver. Every process started here is killed on exit."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shim.triton_server import processes

EMBED = "test/ruri-tiny"
RERANK = "test/ruri-reranker-tiny"
EMBED_V3 = "test/ruri-v3-tiny"
RERANK_V3 = "test/ruri-v3-reranker-tiny"
# Served name -> the tiny_dirs key of the model it serves.
SERVED = {EMBED: "embed", RERANK: "rerank", EMBED_V3: "embed_v3", RERANK_V3: "rerank_v3"}


def padded_batch(lengths: Sequence[int], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Encoder inputs ``names`` of one row a length, random token ids (seeded) padded to the longest: the rows after a
    batch's first are the padded ones."""
    rng = np.random.default_rng(0)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(5, 60, n)
        mask[row, :n] = 1
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: arrays[name] for name in names}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        with contextlib.suppress(Exception):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def children(pid: int) -> list[int]:
    return [p.pid for p in processes() if p.ppid == pid]


def gone_pid() -> int:
    """The pid of a process that has ended: what a work folder left by a process killed hard is named with."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    return any(p.pid == pid for p in processes())


def stubs(under: Path) -> list[int]:
    """Live Triton Python backend stubs whose command line names a path under ``under``."""
    found = []
    for p in processes():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().decode(errors="replace")
            if "triton_python_backend_stub" in cmdline and str(under) in cmdline:
                found.append(p.pid)
    return found


class ServerThread:
    """uvicorn serving an app in a background thread of the test process."""

    def __init__(self, app, wait_healthy: bool = True):
        import uvicorn

        self.wait_healthy = wait_healthy
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def unready(cls, app) -> ServerThread:
        """For apps whose /health is meant to say 503: wait for the server, not for readiness."""
        return cls(app, wait_healthy=False)

    def __enter__(self):
        self.thread.start()
        if self.wait_healthy:
            wait_for(self.url + "/health", timeout=120)
        else:
            deadline = time.monotonic() + 60
            while not self.server.started and time.monotonic() < deadline:
                time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def run_tritonserver(repository: Path, work: Path, ports: tuple[int, int, int] | None = None):
    """A real tritonserver (from the nvidia-pytriton wheel), ready; killed on exit with its stubs."""
    from shim import triton_server

    http, grpc, metrics = ports or (free_port(), free_port(), free_port())
    work = work / f"triton-{grpc}"
    work.mkdir(exist_ok=True)
    log = open(work / f"tritonserver-{time.monotonic_ns()}.log", "wb")
    server = triton_server.Triton(repository, work, http, grpc, metrics, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{http}/v2/health/ready", timeout=180, proc=server.proc)
        yield {"grpc": f"127.0.0.1:{grpc}", "http": f"127.0.0.1:{http}", "proc": server.proc, "ports": (http, grpc, metrics)}
    finally:
        server.stop()  # its Python stubs too, even those of a tritonserver a test killed
        log.close()

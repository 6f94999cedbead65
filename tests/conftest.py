"""Session fixtures: tiny ruri-shaped models -> ``fos export`` -> a real tritonserver and the embedded
backend, each behind the shim on loopback."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import tiny_models

EMBED = "test/ruri-tiny"
RERANK = "test/ruri-reranker-tiny"


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


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"embed": tiny_models.build_embedder(root / "embed"), "rerank": tiny_models.build_reranker(root / "rerank")}


@pytest.fixture(scope="session")
def references(tiny_dirs):
    """sentence-transformers models, loaded as export loads them (token types asked for)."""
    from export.load import load

    return {task: load(str(tiny_dirs[task]), task).model for task in ("embed", "rerank")}


@pytest.fixture(scope="session")
def exported(tiny_dirs, tmp_path_factory) -> dict:
    """Both tiny models exported through the ``fos`` command line, with what it printed."""
    from shim.cli import main

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    printed = {}
    for task, name in (("embed", EMBED), ("rerank", RERANK)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["export", "--model", str(tiny_dirs[task]), "--task", task, "--name", name,
                         "--repository", str(repo), "--encoder-backend", "python"])
        printed[task] = out.getvalue()
        assert code == 0, printed[task]
    return {"repository": repo, "printed": printed}


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
    """A real tritonserver (from the nvidia-pytriton wheel), ready; killed on exit."""
    from shim import triton_server

    http, grpc, metrics = ports or (free_port(), free_port(), free_port())
    work = work / f"triton-{grpc}"
    work.mkdir(exist_ok=True)
    log = open(work / f"tritonserver-{time.monotonic_ns()}.log", "wb")
    proc = triton_server.start(repository, work, http, grpc, metrics, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{http}/v2/health/ready", timeout=180, proc=proc)
        yield {"grpc": f"127.0.0.1:{grpc}", "http": f"127.0.0.1:{http}", "proc": proc, "ports": (http, grpc, metrics)}
    finally:
        proc.kill()
        proc.wait()
        log.close()


@pytest.fixture(scope="session")
def triton(exported, tmp_path_factory):
    with run_tritonserver(exported["repository"], tmp_path_factory.mktemp("triton")) as server:
        yield server


@pytest.fixture(scope="session")
def embedded_server(exported):
    from shim.app import create_app
    from shim.backends.embedded import EmbeddedBackend

    with ServerThread(create_app(EmbeddedBackend(exported["repository"]))) as server:
        yield server


@pytest.fixture(scope="session")
def triton_server(triton):
    from shim.app import create_app
    from shim.backends.triton import TritonBackend

    with ServerThread(create_app(TritonBackend(triton["grpc"]))) as server:
        yield server


@pytest.fixture(scope="session", params=["embedded", "triton"])
def server(request) -> ServerThread:
    """The shim in front of each backend in turn."""
    return request.getfixturevalue(f"{request.param}_server")

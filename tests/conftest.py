"""Session fixtures: tiny ruri-shaped models -> ``fos export`` -> a real tritonserver and the embedded
backend, each behind the shim on loopback."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

import pytest

import tiny_models
from helpers import EMBED, RERANK, ServerThread, run_tritonserver, stubs


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory):
    """Fails the run if a Triton Python stub started by a test outlives the tests (each holds its
    model in memory, and a busy one ignores SIGTERM), killing it first."""
    yield
    left = stubs(tmp_path_factory.getbasetemp())
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"Triton Python stubs left running by the tests: {left}"


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
            code = main(
                [
                    "export",
                    "--model",
                    str(tiny_dirs[task]),
                    "--task",
                    task,
                    "--name",
                    name,
                    "--repository",
                    str(repo),
                    "--encoder-backend",
                    "python",
                ]
            )
        printed[task] = out.getvalue()
        assert code == 0, printed[task]
    return {"repository": repo, "printed": printed}


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

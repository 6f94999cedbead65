"""Session fixtures: tiny ruri-shaped models (v1's BERT and v3's ModernBERT, an embedder and a reranker
of each) -> ``fos export`` into one repository -> a real tritonserver and the embedded backend, each
behind the shim on loopback."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

import pytest

import tiny_models
from helpers import SERVED, ServerThread, run_tritonserver, stubs


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
    # No "ruri" in these paths: the v3 models' prompts must come from the models themselves.
    root = tmp_path_factory.mktemp("models")
    return {
        "embed": tiny_models.build_embedder(root / "embed"),
        "rerank": tiny_models.build_reranker(root / "rerank"),
        "embed_v3": tiny_models.build_embedder_v3(root / "embed_v3"),
        "rerank_v3": tiny_models.build_reranker_v3(root / "rerank_v3"),
    }


def task_of(key: str) -> str:
    return key.split("_")[0]


@pytest.fixture(scope="session")
def references(tiny_dirs):
    """sentence-transformers models by tiny_dirs key, loaded as export loads them (token types asked for)."""
    from export.load import load

    return {key: load(str(folder), task_of(key)).model for key, folder in tiny_dirs.items()}


# The engine each tiny model is exported with (its spec's default for fos serve and Triton's Python encoder): v1's
# models on OpenVINO f32, v3's on onnxruntime, so both engines serve through both backends, at fp32's tolerances on
# any CPU. auto (OpenVINO bf16 where the CPU has bf16 units) has its own tests (test_engines.py).
ENGINES = {"embed": "openvino-fp32", "rerank": "openvino-fp32", "embed_v3": "onnxruntime", "rerank_v3": "onnxruntime"}


@pytest.fixture(scope="session")
def exported(tiny_dirs, tmp_path_factory) -> dict:
    """The tiny models exported through the ``fos`` command line into one repository, with what it
    printed by tiny_dirs key."""
    from shim.cli import main

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    printed = {}
    for name, key in SERVED.items():
        task = task_of(key)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(
                [
                    "export",
                    "--model",
                    str(tiny_dirs[key]),
                    "--task",
                    task,
                    "--name",
                    name,
                    "--repository",
                    str(repo),
                    "--encoder-backend",
                    "python",
                    "--engine",
                    ENGINES[key],
                ]
            )
        printed[key] = out.getvalue()
        assert code == 0, printed[key]
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

"""The Hugging Face hub unreachable, offline or without the model: one clear message and a non-zero
exit, before anything slow; a cached model is used without the hub. Every case runs ``fos`` in a
subprocess with its own HF_HOME and HF_ENDPOINT on loopback, so no test touches the network."""

from __future__ import annotations

import collections
import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import free_port

HINTS = ("--model /path/to/", "=/path/to/", "--name ", "HF_HUB_OFFLINE=1", "HF_ENDPOINT=")


def fos(args: list[str], tmp_path: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    environ.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, **env)
    return subprocess.run(
        [sys.executable, "-m", "shim.cli", *args], env=environ, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


def closed_port_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def assert_one_clear_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert "Traceback" not in err and "Retry" not in err, err
    for text in expected:
        assert text in err, err
    lines = [line for line in (result.stdout + err).splitlines() if line.strip()]
    assert not [line for line, n in collections.Counter(lines).items() if n > 1], err


@pytest.mark.parametrize("command", ["serve", "export"])
def test_unreachable_hub_is_one_clear_error(tmp_path, command):
    endpoint = closed_port_endpoint()
    args = ["serve", "--model", "some/unreachable-id", "--repository", str(tmp_path / "repo")]
    if command == "export":
        args = ["export", "--model", "some/unreachable-id", "--task", "embed", "--repository", str(tmp_path / "repo")]
    result = fos(args, tmp_path, endpoint)
    assert_one_clear_error(result, f"cannot reach {endpoint}", "not in the Hugging Face cache", *HINTS)
    assert not (tmp_path / "repo").exists()


def test_offline_without_the_model_in_the_cache(tmp_path):
    result = fos(["serve", "--model", "some/uncached-id"], tmp_path, closed_port_endpoint(), HF_HUB_OFFLINE="1")
    assert_one_clear_error(result, "HF_HUB_OFFLINE is set", "not in the Hugging Face cache", *HINTS)


class _NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """A hub (or mirror) that knows no model, answering as the hub does."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_model_the_hub_does_not_have(tmp_path):
    with fake_hub() as endpoint:
        result = fos(["serve", "--model", "cl-nagoya/ruri-typo"], tmp_path, endpoint)
    assert_one_clear_error(result, f"cl-nagoya/ruri-typo was not found on {endpoint}", "HF_TOKEN")


def test_a_path_that_is_not_there(tmp_path):
    result = fos(["serve", "--model", "./models/ruri-v3-310m"], tmp_path, closed_port_endpoint())
    assert_one_clear_error(result, "no such directory")


def test_cached_model_is_used_when_the_hub_is_unreachable(tiny_dirs, tmp_path):
    # The cache as `hf download` leaves it: snapshots/<commit>/ and refs/main naming the commit.
    repo = tmp_path / "hf" / "hub" / "models--test--cached-ruri"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dirs["embed"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    args = ["export", "--model", "test/cached-ruri", "--task", "embed", "--repository", str(tmp_path / "repo")]
    result = fos(args, tmp_path, closed_port_endpoint())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from the local cache" in result.stdout and "PASS" in result.stdout
    assert "Retry" not in result.stderr
    assert (tmp_path / "repo" / "test--cached-ruri" / "config.pbtxt").exists()


def test_hub_log_lines_print_once(tmp_path):
    code = (
        "import logging; from shim.serve import configure_logging; configure_logging('info'); "
        "import transformers, huggingface_hub.file_download; "
        "logging.getLogger('huggingface_hub.file_download').warning('only once')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "only once" in line]
    assert len(lines) == 1 and "WARNING huggingface_hub.file_download: only once" in lines[0], result.stderr

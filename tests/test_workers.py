"""``fos serve --workers N`` (Triton backend): N processes share the port; the embedded backend refuses it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import EMBED, free_port, wait_for


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def test_workers_serve_through_triton(triton):
    port = free_port()
    cmd = [sys.executable, "-m", "shim.cli", "serve", "--triton", triton["grpc"], "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", 120, proc)
        for _ in range(20):
            r = httpx.post(url + "/v1/embeddings", json={"model": EMBED, "input": "猫が寝ている"}, timeout=30)
            assert r.status_code == 200
        workers = [p for p in _children(proc.pid) if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2, workers
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    time.sleep(0.5)
    assert not _children(proc.pid)


def test_workers_need_triton(exported):
    r = subprocess.run(
        [sys.executable, "-m", "shim.cli", "serve", "--repository", str(exported["repository"]), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "--workers needs --triton" in r.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engine-streams", "0"], "argument --engine-streams: at least 1 stream, or auto, not 0"),
        (["--engine-streams", "many"], "argument --engine-streams: a number of streams (1 or more) or auto, not 'many'"),
        (["--engine-streams", "1", "--triton", "127.0.0.1:1"], "--engine-streams is the embedded backend's"),
        (["--engine-streams", "2", "--triton", "127.0.0.1:1"], "--engine-streams is the embedded backend's"),
        # Flags that would do nothing are refused, not ignored.
        (["--threads", "4", "--triton", "127.0.0.1:1"], "--threads sizes the embedded backend's"),
        (["--precision", "int8"], "--precision is the precision --model exports at"),
    ],
)
def test_engine_streams_are_checked_before_anything_loads(exported, flags, message):
    r = subprocess.run(
        [sys.executable, "-m", "shim.cli", "serve", "--repository", str(exported["repository"]), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and message in r.stderr

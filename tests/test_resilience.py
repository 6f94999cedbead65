"""Faults and load: Triton down at start, Triton killed and restarted under load, 10x overload,
and integrity (one answer per input, in order) over random batches through both backends."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.app import create_app
from shim.backends.triton import TritonBackend

import tiny_models
from helpers import EMBED, ServerThread, free_port, gone_pid, run_tritonserver, wait_for

POOL = [*tiny_models.corpus()[:12], "猫", "ＡＢＣ１２３", "猫" * 200]


@pytest.fixture(scope="module")
def pool_reference(references) -> np.ndarray:
    v = references["embed"].encode(POOL, convert_to_numpy=True)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_triton_unreachable_at_start_then_503():
    with ServerThread.unready(create_app(TritonBackend(f"127.0.0.1:{free_port()}", timeout_s=2))) as shim:
        health = httpx.get(shim.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "not_ready"
        r = httpx.post(shim.url + "/v1/embeddings", json={"model": EMBED, "input": "猫"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_hung_triton_hits_the_deadline_then_recovers(triton):
    # SIGSTOP keeps Triton's sockets open but answers nothing: only the call's deadline ends the wait.
    # That is a 504 (slowness is not death); the readiness probe, which a live Triton always answers,
    # is what takes the endpoint out of rotation.
    import os
    import signal

    deadline = 2.0
    with ServerThread(create_app(TritonBackend(triton["grpc"], timeout_s=deadline, probe_s=0.3))) as shim:
        body = {"model": EMBED, "input": ["猫が寝ている"]}
        assert httpx.post(shim.url + "/v1/embeddings", json=body).status_code == 200
        os.kill(triton["proc"].pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            r = httpx.post(shim.url + "/v1/embeddings", json=body, timeout=30)
            waited = time.monotonic() - start
            print(f"\nhung Triton: {r.status_code} after {waited:.2f}s (deadline {deadline}s)")
            assert r.status_code in (503, 504), r.text
            assert r.json()["error"]["code"] in ("backend_timeout", "backend_unavailable")
            assert waited < deadline + 1.5
            start = time.monotonic()
            while httpx.get(shim.url + "/health", timeout=30).status_code != 503:
                assert time.monotonic() - start < deadline + 3, "a hung Triton still looks ready"
                time.sleep(0.1)
        finally:
            os.kill(triton["proc"].pid, signal.SIGCONT)
        start = time.monotonic()
        while httpx.post(shim.url + "/v1/embeddings", json=body, timeout=30).status_code != 200:
            assert time.monotonic() - start < 15, "no recovery after SIGCONT"
            time.sleep(0.1)
        print(f"recovered {time.monotonic() - start:.2f}s after SIGCONT")


def test_triton_killed_and_restarted_under_load(exported, tmp_path):
    ports = free_port(), free_port(), free_port()
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()
    with ServerThread.unready(create_app(TritonBackend(f"127.0.0.1:{ports[1]}", timeout_s=10, probe_s=0.3))) as shim:

        def load() -> None:
            with httpx.Client(base_url=shim.url, timeout=30) as http:
                while not stop.is_set():
                    r = http.post("/v1/embeddings", json={"model": EMBED, "input": ["猫が寝ている", "東京は首都"]})
                    statuses.append((time.monotonic(), r.status_code))
                    if r.status_code != 200:
                        time.sleep(0.05)

        with run_tritonserver(exported["repository"], tmp_path, ports):
            wait_for(shim.url + "/health", 60)
            workers = [threading.Thread(target=load) for _ in range(2)]
            for w in workers:
                w.start()
            time.sleep(2)
            killed = time.monotonic()  # leaving the with-block kills it
        time.sleep(2)
        restarting = time.monotonic()
        with run_tritonserver(exported["repository"], tmp_path, ports):
            ready = time.monotonic()
            deadline = ready + 60
            while time.monotonic() < deadline and not any(t > ready and s == 200 for t, s in statuses):
                time.sleep(0.1)
            stop.set()
            for w in workers:
                w.join(timeout=30)
    seen = {s for _, s in statuses}
    before = [s for t, s in statuses if t < killed]
    # Requests in flight at the kill may still succeed; the restarted server may answer before the
    # test sees it ready.
    down = [s for t, s in statuses if killed + 1.0 < t < restarting]
    after = [t for t, s in statuses if t > ready and s == 200]
    assert before and set(before) == {200}
    assert down and set(down) == {503}, seen
    assert seen <= {200, 503}
    assert after, "no success after Triton came back"
    print(f"\ncodes seen: {sorted(seen)}; recovered {after[0] - ready:.2f}s after Triton was ready again")


@contextlib.contextmanager
def fos_triton(repository: Path, tmp_path: Path):
    """`fos triton` on free ports, ready; yields (process, grpc port, its log) and kills it and its stubs after."""
    import os
    import signal

    from helpers import alive, children

    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "shim.cli", "triton", "--repository", str(repository)]
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    log = tmp_path / "fos-triton.log"
    stubs: list[int] = []
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, *ports], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://127.0.0.1:{http}/v2/health/ready", 180, proc)
            (tritonserver,) = children(proc.pid)
            stubs = children(tritonserver)
            yield proc, grpc, log
        finally:
            proc.kill()
            proc.wait()
            for pid in stubs:  # so that a failure here leaks nothing either
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_fos_triton_takes_its_stubs_down_when_tritonserver_dies_hard(exported, tmp_path):
    # As the OOM killer would: SIGKILL tritonserver under load. Its busy Python stubs, each holding
    # a model in memory, outlived it for minutes; `fos triton` must end them and exit non-zero.
    import os
    import signal

    from shim.repository import read_specs

    from helpers import alive, children

    stop = threading.Event()
    with fos_triton(exported["repository"], tmp_path) as (proc, grpc, _):
        (tritonserver,) = children(proc.pid)
        stubs = children(tritonserver)
        # A tokenizer and an encoder model for each served model.
        assert len(stubs) == 2 * len(read_specs(exported["repository"]))
        with ServerThread(create_app(TritonBackend(f"127.0.0.1:{grpc}", timeout_s=10))) as shim:

            def load() -> None:
                with httpx.Client(base_url=shim.url, timeout=30) as client:
                    while not stop.is_set():
                        client.post("/v1/embeddings", json={"model": EMBED, "input": ["猫が寝ている。" * 3] * 64})

            workers = [threading.Thread(target=load) for _ in range(4)]
            for w in workers:
                w.start()
            try:
                time.sleep(2)
                os.kill(tritonserver, signal.SIGKILL)
                code = proc.wait(timeout=15)
                left = [pid for pid in stubs if alive(pid)]
            finally:
                stop.set()
                for w in workers:
                    w.join(timeout=30)
    assert code != 0
    assert not left, f"stubs outlived tritonserver: {left}"
    print(f"\nfos triton exited {code}; its {len(stubs)} stubs with it")


def test_one_ctrl_c_under_uv_run_still_unloads_the_models(exported, tmp_path):
    # `uv run fos triton` passes a terminal's Ctrl-C on, so fos triton got it twice at once: the second killed
    # tritonserver (137) instead of letting it unload its models (a review).
    import signal
    import tempfile

    # And the work folder a fos triton killed hard left behind is removed (its pid is gone).
    left = Path(tempfile.gettempdir()) / f"fos-triton-{gone_pid()}-test"
    left.mkdir(exist_ok=True)
    with fos_triton(exported["repository"], tmp_path) as (proc, _, log):
        assert not left.exists()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-2000:]


def test_a_stub_that_dies_stops_fos_triton(exported, tmp_path):
    # Triton (since 24.06) does not start a dead Python stub again: its model failed every request (502) while Triton
    # and the shim's /health said ready. fos triton stops, so that what runs it starts it again whole.
    import os
    import signal

    from helpers import alive, children

    with fos_triton(exported["repository"], tmp_path) as (proc, _, log):
        time.sleep(2)  # fos triton sees it ready too
        (tritonserver,) = children(proc.pid)
        stubs = children(tritonserver)
        os.kill(stubs[0], signal.SIGKILL)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert code != 0 and f"stub (pid {stubs[0]}) died" in text, text[-2000:]
    assert not [pid for pid in stubs if alive(pid)]


def test_ten_times_capacity_memory_stays_flat(exported, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shim.cli",
            "serve",
            "--repository",
            str(exported["repository"]),
            "--port",
            str(port),
            "--max-inputs-in-flight",
            "32",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def peak_rss_mb() -> float:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    try:
        wait_for(url + "/health", 120, proc)
        body = {"model": EMBED, "input": [f"{i}番目の文です。" + "猫" * (i % 20) for i in range(16)]}
        httpx.post(url + "/v1/embeddings", json=body, timeout=30)  # warm
        start_mb = peak_rss_mb()
        codes: list[int] = []

        def client() -> None:
            end = time.monotonic() + 8
            with httpx.Client(base_url=url, timeout=30) as http:
                while time.monotonic() < end:
                    codes.append(http.post("/v1/embeddings", json=body).status_code)

        clients = [threading.Thread(target=client) for _ in range(20)]  # 20 x 16 inputs = 10x the 32 admitted
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        end_mb = peak_rss_mb()
        recovered = httpx.post(url + "/v1/embeddings", json=body, timeout=30).status_code
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    counts = {code: codes.count(code) for code in set(codes)}
    print(f"\n10x load: {counts}; peak RSS {start_mb:.0f} MB -> {end_mb:.0f} MB")
    assert set(counts) == {200, 429}
    assert end_mb - start_mb < 150
    assert recovered == 200


@given(st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=40))
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_input_answered_in_order(server, pool_reference, picks):
    texts = [POOL[i] for i in picks]  # duplicates and mixed lengths included
    r = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": texts}, timeout=60)
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(texts)))
    got = np.array([d["embedding"] for d in data])
    assert np.max(np.abs(got - pool_reference[picks])) <= 1e-4


def test_backends_agree(embedded_server, triton_server):
    body = {"model": EMBED, "input": POOL}
    a = np.array([d["embedding"] for d in httpx.post(embedded_server.url + "/v1/embeddings", json=body).json()["data"]])
    b = np.array([d["embedding"] for d in httpx.post(triton_server.url + "/v1/embeddings", json=body).json()["data"]])
    assert np.max(np.abs(a - b)) <= 1e-5

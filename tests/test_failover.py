"""Two real tritonservers behind one shim: one stops mid-load, every request still succeeds, and the
stopped one is taken back once it is ready again."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import httpx

from fos_runtime import spec
from shim.app import create_app
from shim.backends.triton import TritonBackend

from helpers import EMBED, RERANK, ServerThread, free_port, run_tritonserver


def _inferences(http: str) -> int:
    name = spec.triton_name(EMBED)
    with urllib.request.urlopen(f"http://{http}/v2/models/{name}/stats") as r:
        return sum(m["inference_stats"]["success"]["count"] for m in json.load(r)["model_stats"])


def test_one_of_two_tritons_stops_mid_load(exported, tmp_path):
    repo = exported["repository"]
    ports_a = (free_port(), free_port(), free_port())
    statuses: list[int] = []
    stop = threading.Event()
    with run_tritonserver(repo, tmp_path) as b, run_tritonserver(repo, tmp_path, ports_a) as a:
        backend = TritonBackend([a["grpc"], b["grpc"]], timeout_s=10, probe_s=0.3)
        with ServerThread(create_app(backend)) as shim:

            def load() -> None:
                with httpx.Client(base_url=shim.url, timeout=30) as http:
                    while not stop.is_set():
                        statuses.append(
                            http.post("/v1/embeddings", json={"model": EMBED, "input": ["猫", "犬が走る"]}).status_code
                        )

            workers = [threading.Thread(target=load) for _ in range(3)]
            for w in workers:
                w.start()
            time.sleep(2)
            used_a = _inferences(a["http"])
            a["proc"].kill()  # mid-load, no warning
            time.sleep(3)
            stopped_at = len(statuses)
            with run_tritonserver(repo, tmp_path, ports_a) as a2:
                deadline = time.monotonic() + 30
                while _inferences(a2["http"]) == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)
                back_in_rotation = _inferences(a2["http"]) > 0
                stop.set()
                for w in workers:
                    w.join(timeout=30)
    assert used_a > 0, "requests were not spread over both endpoints"
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert len(statuses) > stopped_at
    assert back_in_rotation, "the restarted endpoint never got traffic again"


def test_a_triton_restarted_with_other_models_is_learnt_again(exported, tmp_path):
    # The models were learnt once: a Triton restarted without one of them kept the endpoint down for every model
    # (each probe asked for the missing one), and models it gained were never served.
    import shutil

    full = exported["repository"]
    embed_only = tmp_path / "embed-only"
    for name in (
        spec.triton_name(EMBED),
        spec.tokenizer_model(spec.triton_name(EMBED)),
        spec.encoder_model(spec.triton_name(EMBED)),
    ):
        shutil.copytree(full / name, embed_only / name)
    ports = (free_port(), free_port(), free_port())

    def served(shim: ServerThread) -> set[str]:
        return {m["id"] for m in httpx.get(shim.url + "/v1/models").json()["data"]}

    def until(check, what: str) -> None:
        deadline = time.monotonic() + 60
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    body = {"model": EMBED, "input": "猫"}
    with run_tritonserver(embed_only, tmp_path, ports) as first:
        backend = TritonBackend([first["grpc"]], timeout_s=10, probe_s=0.3)
        with ServerThread(create_app(backend)) as shim:
            assert served(shim) == {EMBED}
            first["proc"].kill()
            with run_tritonserver(full, tmp_path, ports):
                until(lambda: RERANK in served(shim), "the models of the restarted Triton were never learnt")
                assert httpx.post(shim.url + "/v1/embeddings", json=body, timeout=30).status_code == 200
                rerank = {"model": RERANK, "query": "猫", "documents": ["犬"]}
                assert httpx.post(shim.url + "/v1/rerank", json=rerank, timeout=30).status_code == 200
            # stopped: restarted with the embedder alone
            with run_tritonserver(embed_only, tmp_path, ports):
                until(
                    lambda: httpx.post(shim.url + "/v1/embeddings", json=body, timeout=30).status_code == 200,
                    "a Triton without the reranker never served the embedder again",
                )
                assert served(shim) == {EMBED}
                assert httpx.post(shim.url + "/v1/rerank", json=rerank, timeout=30).status_code == 404

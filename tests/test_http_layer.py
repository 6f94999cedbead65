"""The HTTP layer on a model-less backend: API keys, readiness, overload, request ids, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from shim.app import create_app
from shim.auth import load_keys

from fakes import FakeBackend

BODY = {"model": "fake/embed", "input": "猫"}


def test_keys_required_when_configured():
    with TestClient(create_app(FakeBackend(), api_keys=["k1", "secret-2"])) as http:
        for headers in (
            {},
            {"Authorization": ""},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "secret-2"},
            {"Authorization": "Basic secret-2"},
        ):
            r = http.post("/v1/embeddings", json=BODY, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/embeddings", json=BODY, headers={"Authorization": "Bearer secret-2"}).status_code == 200
        assert http.post("/v1/embeddings", json=BODY, headers={"Authorization": "bearer k1"}).status_code == 200
        assert http.get("/health").status_code == 200  # probes carry no key


def test_any_authorization_accepted_when_off():
    with TestClient(create_app(FakeBackend())) as http:
        for headers in ({}, {"Authorization": ""}, {"Authorization": "Bearer anything"}):
            assert http.post("/v1/embeddings", json=BODY, headers=headers).status_code == 200


def test_keys_from_flags_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# ops keys\nfile-key\n\n")
    assert load_keys(["a", " "], f, environ={"FOS_API_KEYS": "b, c,a"}) == ["a", "b", "c", "file-key"]
    assert load_keys(environ={}) == []


def test_not_ready_backend_answers_503_not_404():
    with TestClient(create_app(FakeBackend(ready=False))) as http:
        r = http.post("/v1/embeddings", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        assert http.get("/health").status_code == 503
        r = http.get("/v1/models/fake/embed")  # not "does not exist": it may be loading
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"


def test_overload_is_a_429_with_retry_after_and_recovers():
    import asyncio

    import httpx

    from shim.service import Limits

    async def scenario():
        app = create_app(FakeBackend(delay=0.3), limits=Limits(max_inputs_in_flight=4))
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            bodies = [{"model": "fake/embed", "input": ["猫", "犬"]} for _ in range(6)]
            answers = await asyncio.gather(*(http.post("/v1/embeddings", json=b) for b in bodies))
            codes = sorted(a.status_code for a in answers)
            assert codes == [200, 200, 429, 429, 429, 429]
            busy = next(a for a in answers if a.status_code == 429)
            assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "overloaded"
            after = await http.post("/v1/embeddings", json=bodies[0])  # load gone: served again
            assert after.status_code == 200
            metrics = (await http.get("/metrics")).text
            assert "fos_overload_rejections_total 4.0" in metrics
            assert "fos_inputs_in_flight 0.0" in metrics

    asyncio.run(scenario())


def test_a_request_without_a_key_is_a_401_even_when_the_server_is_full():
    import asyncio

    import httpx

    from shim.service import Limits

    async def scenario():
        app = create_app(FakeBackend(delay=0.3), limits=Limits(max_inputs_in_flight=1), api_keys=["k1"])
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            key = {"Authorization": "Bearer k1"}
            busy = asyncio.create_task(http.post("/v1/embeddings", json=BODY, headers=key))
            await asyncio.sleep(0.1)  # it holds the server's one input
            assert (await http.post("/v1/embeddings", json=BODY)).status_code == 401
            assert (await http.post("/v1/embeddings", json=BODY, headers=key)).status_code == 429
            assert (await busy).status_code == 200
            assert "fos_overload_rejections_total 1.0" in (await http.get("/metrics")).text

    asyncio.run(scenario())


def test_a_start_that_fails_part_way_is_closed():
    import asyncio

    closed = []

    class HalfStarted(FakeBackend):
        async def start(self):
            raise RuntimeError("the second model's file is bad")  # the first one's threads and tasks running

        async def close(self):
            closed.append(True)

    async def scenario():
        app = create_app(HalfStarted())
        with pytest.raises(RuntimeError):
            async with app.router.lifespan_context(app):
                pass

    asyncio.run(scenario())
    assert closed == [True]


def test_request_larger_than_the_admission_capacity_is_a_400_naming_it(caplog):
    from shim.service import Limits

    limits = Limits(max_inputs_in_flight=4, max_inputs=10, max_documents=6)
    with caplog.at_level("WARNING", logger="fos.service"), TestClient(create_app(FakeBackend(), limits=limits)) as http:
        for path, body, param in [
            ("/v1/embeddings", {"model": "fake/embed", "input": ["猫"] * 5}, "input"),
            ("/v1/embeddings", {"model": "fake/embed", "input": [[5]] * 5}, "input"),
            ("/v1/rerank", {"model": "fake/rerank", "query": "q", "documents": ["猫"] * 5}, "documents"),
        ]:
            r = http.post(path, json=body)  # an idle server: a 429 "retry shortly" would be retried forever
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param and "--max-inputs-in-flight" in r.json()["error"]["message"]
            assert "retry-after" not in r.headers
        assert http.post("/v1/embeddings", json={"model": "fake/embed", "input": ["猫"] * 4}).status_code == 200
    warned = [r.getMessage() for r in caplog.records if r.name == "fos.service"]
    assert len(warned) == 2 and "--max-inputs 10" in warned[0] and "--max-documents 6" in warned[1]


def test_non_finite_outputs_are_a_server_error_never_null():
    # A NaN went out as JSON null in an embedding, and sorted a ranking at random.
    class Overflowing(FakeBackend):
        async def embed(self, s, texts=None, encoded=None, detect_truncation=False):
            out = await super().embed(s, texts, encoded, detect_truncation)
            if len(out.values) > 1:
                out.values[1, 2] = np.nan
            return out

        async def rerank(self, s, query, documents, detect_truncation=False, max_doc_tokens=None):
            out = await super().rerank(s, query, documents, detect_truncation, max_doc_tokens)
            out.values[2] = np.inf
            return out

    with TestClient(create_app(Overflowing())) as http:
        r = http.post("/v1/embeddings", json={"model": "fake/embed", "input": ["猫", "犬", "鳥"]})
        assert r.status_code == 500 and "input[1]" in r.json()["error"]["message"]
        assert r.headers["x-should-retry"] == "false"  # the openai client retried it twice, to overflow again
        r = http.post("/v1/rerank", json={"model": "fake/rerank", "query": "q", "documents": ["a", "b", "c"]})
        assert r.status_code == 500 and "documents[2]" in r.json()["error"]["message"]
        assert http.post("/v1/embeddings", json={"model": "fake/embed", "input": "猫"}).status_code == 200
        assert "fp32 export" not in r.json()["error"]["message"]  # the fp16 hint is for fp16 exports


def test_deeply_nested_json_is_a_400():
    # A recursive walk over the whole request once ran out of stack on nesting json.loads still parses: a 500.
    deep = "[" * 900 + "]" * 900
    with TestClient(create_app(FakeBackend())) as http:
        for body in ('{"model": "fake/embed", "input": "a", "user": DEEP}', '{"model": "fake/embed", "input": DEEP}'):
            content = body.replace("DEEP", deep).encode()
            r = http.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
        # The single-model operation answers a card or a 404, never the list (the fuzzer's /v1/models/%0A).
        for path in ("/v1/models/", "/v1/models/%0A"):
            r = http.get(path)
            assert r.status_code == 404 and "GET /v1/models lists them" in r.json()["error"]["message"], path


def test_an_unexpected_error_is_a_500_that_keeps_the_connection():
    # Starlette's last-resort handler answers and then raises again: uvicorn closed the connection without saying so,
    # and the next request a pooled client sent on it failed.
    import httpx

    from helpers import ServerThread

    class Broken(FakeBackend):
        async def embed(self, s, texts=None, encoded=None, detect_truncation=False):
            if texts == ["boom"]:
                raise RuntimeError("a bug")
            return await super().embed(s, texts, encoded, detect_truncation)

    with ServerThread(create_app(Broken())) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            r = client.post("/v1/embeddings", json={"model": "fake/embed", "input": "boom"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
            assert r.headers.get("connection") != "close"
            assert client.post("/v1/embeddings", json=BODY).status_code == 200
        metrics = client.get("/metrics").text
        assert 'fos_requests_total{route="/v1/embeddings",status="500"} 3.0' in metrics


def test_request_id_is_echoed_and_metrics_count_requests():
    with TestClient(create_app(FakeBackend())) as http:
        r = http.post("/v1/embeddings", json=BODY, headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert len(http.get("/v1/models").headers["x-request-id"]) == 32
        http.post("/v1/embeddings", json={"input": ""})
        text = http.get("/metrics").text
        assert 'fos_requests_total{route="/v1/embeddings",status="200"} 1.0' in text
        assert 'fos_requests_total{route="/v1/embeddings",status="400"} 1.0' in text
        assert 'fos_tokens_total{model="fake/embed"} 1.0' in text


def test_client_disconnect_cancels_the_work():
    import time

    import httpx

    from fakes import SlowBackend
    from helpers import ServerThread

    backend = SlowBackend(delay=3.0)
    with ServerThread(create_app(backend)) as server:
        try:
            httpx.post(server.url + "/v1/embeddings", json=BODY, timeout=0.5)
        except httpx.TimeoutException:
            pass
        deadline = time.monotonic() + 5
        while backend.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.cancelled == 1 and backend.finished == 0
        assert (
            httpx.post(server.url + "/v1/embeddings", json={"model": "fake/embed", "input": "x"}, timeout=10).status_code == 200
        )


def test_sigterm_finishes_requests_in_flight(tmp_path):
    import signal
    import subprocess
    import sys
    import threading
    import time

    import httpx

    from helpers import free_port, wait_for

    port = free_port()
    script = tmp_path / "serve_fake.py"
    script.write_text(
        "import sys, uvicorn\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from fakes import FakeBackend\nfrom shim.app import create_app\n"
        f"uvicorn.run(create_app(FakeBackend(delay=2.0)), host='127.0.0.1', port={port}, timeout_graceful_shutdown=10)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 30, proc)
        result = {}
        t = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=BODY, timeout=20))
        )
        t.start()
        time.sleep(0.5)  # the request is in the backend now
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=20)
        assert result["r"].status_code == 200
        # uvicorn re-raises SIGTERM once it has shut down cleanly, so the exit looks like the signal's.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        proc.kill()


def test_requests_cut_off_by_the_graceful_timeout_get_a_503_envelope(tmp_path):
    import signal
    import subprocess
    import sys
    import threading
    import time

    import httpx

    from helpers import free_port, wait_for

    port = free_port()
    script = tmp_path / "serve_slow.py"
    script.write_text(
        "import logging, sys, uvicorn\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from fakes import FakeBackend\nfrom shim.app import create_app\n"
        "logging.basicConfig(level='INFO')\n"
        f"uvicorn.run(create_app(FakeBackend(delay=30)), host='127.0.0.1', port={port}, timeout_graceful_shutdown=1)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 30, proc)
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=BODY, timeout=20))

        clients = [threading.Thread(target=ask) for _ in range(2)]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 10
        while "fos_inputs_in_flight 2.0" not in httpx.get(f"http://127.0.0.1:{port}/metrics").text:
            assert time.monotonic() < deadline, "the requests never reached the backend"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(timeout=20)
        output = proc.communicate(timeout=20)[0]
    finally:
        proc.kill()
    assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
    for a in answers:
        assert a.headers["content-type"] == "application/json"
        assert a.json()["error"]["code"] == "shutting_down" and a.json()["error"]["type"] == "server_error"
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output
    assert output.count("cut off") == 2, output  # one line per request


def test_client_gone_during_upload_counts_as_499_not_400():
    import socket
    import time

    import httpx

    from helpers import ServerThread

    with ServerThread(create_app(FakeBackend())) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model": "fake/embed", "input": "'
            )
            time.sleep(0.3)  # the app is reading the body
        deadline = time.monotonic() + 5
        while 'route="/v1/embeddings"' not in (text := httpx.get(server.url + "/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
    assert 'fos_requests_total{route="/v1/embeddings",status="499"} 1.0' in text, text
    assert 'status="400"' not in text


def test_body_size_cap_announced_or_chunked():
    from shim.service import Limits

    with TestClient(create_app(FakeBackend(), limits=Limits(max_body_bytes=1000))) as http:
        r = http.post("/v1/embeddings", json={"model": "fake/embed", "input": "猫" * 1000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield b'{"model": "fake/embed", "input": "'
            for _ in range(100):
                yield b"x" * 50
            yield b'"}'

        r = http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert http.post("/v1/embeddings", json=BODY).status_code == 200


def test_validation_messages_say_what_this_endpoint_takes():
    with TestClient(create_app(FakeBackend())) as http:
        r = http.post("/v1/embeddings", content=b"", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is empty: send a JSON object"
        objects = {"model": "fake/rerank", "query": "q", "documents": [{"text": "a"}]}
        assert http.post("/v1/rerank", json=objects).status_code == 200
        r = http.post("/v2/rerank", json=objects)  # Cohere's v2 takes strings only: say so, not "or objects"
        assert r.status_code == 400 and r.json()["error"]["message"] == "documents must be a list of strings (Cohere's v2 rerank)"
        r = http.post("/v1/rerank", json={**objects, "documents": [{"txt": "a"}]})
        assert "objects with a 'text' string" in r.json()["error"]["message"]
        # An empty list is named as one, not as a value of the wrong kind; an empty list of token ids is no empty input.
        for path, body, param in (
            ("/v1/embeddings", {**BODY, "input": []}, "input"),
            ("/v1/rerank", {**objects, "documents": []}, "documents"),
        ):
            error = http.post(path, json=body).json()["error"]
            assert (error["message"], error["param"]) == (f"{param} must not be an empty list", param)
        assert "empty" not in http.post("/v1/embeddings", json={**BODY, "input": [[]]}).json()["error"]["message"]
        # ... and only for the field that is empty (another field's error named "model" once).
        error = http.post("/v1/embeddings", json={"model": 5, "input": []}).json()["error"]
        assert error["param"] == "model" and "empty" not in error["message"]
        # Bytes that are no UTF-8, or JSON too deep for json.loads: FastAPI's own 400, in the envelope with a code.
        for content in ('{"model": "fake/embed", "input": "a\xff"}'.encode("latin-1"), b"[" * 100_000):
            r = http.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        # What monitors probe with HEAD answers as GET does, without a body.
        for path in ("/health", "/v1/models"):
            r = http.head(path)
            assert r.status_code == 200 and r.content == b"", path


def test_unknown_fields_are_ignored():
    with TestClient(create_app(FakeBackend())) as http:
        r = http.post("/v1/embeddings", json={**BODY, "truncate": True, "something_new": {"a": 1}})
        assert r.status_code == 200
        r = http.post("/v1/rerank", json={"model": "fake/rerank", "query": "q", "documents": ["d"], "rank_fields": ["x"]})
        assert r.status_code == 200


def test_over_long_token_ids_refused_before_any_compute():
    backend = FakeBackend()  # its models take 16 tokens
    with TestClient(create_app(backend)) as http:
        r = http.post("/v1/embeddings", json={"model": "fake/embed", "input": [[5] * 17], "truncate": False})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert backend.calls == 0
        assert (
            http.post("/v1/embeddings", json={"model": "fake/embed", "input": [[5] * 16], "truncate": False}).status_code == 200
        )
        assert backend.calls == 1


BLANK = ["", " ", "\u3000", "\u00a0", "\u200b", "\ufeff", "\x00", "\t\r\n", "\u200b\u3000\ufeff\u2060"]


def test_blank_text_is_refused_naming_it():
    # One rule for embeddings input, rerank query and documents: no visible character, no embedding;
    # zero-width spaces and BOMs were embedded as [UNK], ideographic spaces refused without an index.
    backend = FakeBackend()
    with TestClient(create_app(backend)) as http:
        for blank in BLANK:
            for path, body, param, where in [
                ("/v1/embeddings", {"model": "fake/embed", "input": ["猫", blank]}, "input", "input[1]"),
                ("/v1/embeddings", {"model": "fake/embed", "input": blank}, "input", "input[0]"),
                (
                    "/v1/rerank",
                    {"model": "fake/rerank", "query": "q", "documents": ["猫", {"text": blank}]},
                    "documents",
                    "documents[1]",
                ),
                ("/v1/rerank", {"model": "fake/rerank", "query": blank, "documents": ["猫"]}, "query", "'query'"),
            ]:
                r = http.post(path, json=body)
                assert r.status_code == 400, (blank, path, r.text)
                error = r.json()["error"]
                assert error["param"] == param and error["message"].startswith(where + " is empty"), (blank, error)
        assert backend.calls == 0
        # Visible text around those characters is kept and served.
        assert http.post("/v1/embeddings", json={"model": "fake/embed", "input": "\u200b猫\u3000"}).status_code == 200


def test_model_may_be_left_out_when_one_of_its_task_is_served():
    with TestClient(create_app(FakeBackend())) as http:
        assert http.post("/v1/embeddings", json={"input": "猫"}).json()["model"] == "fake/embed"
        assert http.post("/v1/rerank", json={"query": "猫", "documents": ["犬"]}).json()["model"] == "fake/rerank"
        assert http.post("/v2/rerank", json={"query": "猫", "documents": ["犬"]}).status_code == 200

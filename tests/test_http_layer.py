"""The HTTP layer on a model-less backend: API keys, readiness, overload, request ids, metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fakes import FakeBackend
from shim.app import create_app
from shim.auth import load_keys

BODY = {"model": "fake/embed", "input": "猫"}


def test_keys_required_when_configured():
    with TestClient(create_app(FakeBackend(), api_keys=["k1", "secret-2"])) as http:
        for headers in ({}, {"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret-2"},
                        {"Authorization": "Basic secret-2"}):
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

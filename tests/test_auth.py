"""Optional API keys."""

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

"""Work for clients that left stops, and admission counts only the work really running (embedded backend)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from shim.app import create_app
from shim.backends.embedded import EmbeddedBackend
from shim.service import Limits

from helpers import EMBED, ServerThread

LONG = "東京は日本の首都で、多くの人が電車で通勤しています。" * 80  # ~2,000 characters, as in the report


class Counting:
    """Wraps a tokenizer's encode to count the inputs it was given."""

    def __init__(self, encode):
        self.encode = encode
        self.inputs = 0

    def __call__(self, texts, *args):
        self.inputs += len(texts)
        return self.encode(texts, *args)


def _in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r"^fos_inputs_in_flight (\S+)$", text, re.M).group(1))


@pytest.fixture()
def counted_server(exported):
    backend = EmbeddedBackend(exported["repository"])
    with ServerThread(create_app(backend, Limits(max_inputs_in_flight=4096))) as server:
        model = backend.models[EMBED]
        counter = Counting(model.tokenizer.encode)
        model.tokenizer.encode = counter
        yield server, counter


def test_a_departed_clients_work_stops_and_its_capacity_returns_only_then(counted_server):
    server, counter = counted_server
    texts = [LONG] * 2048
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": texts}, timeout=2.0)
    deadline = time.monotonic() + 10
    while _in_flight(server.url) > 0:
        assert time.monotonic() < deadline, "admitted work never ended"
        time.sleep(0.02)
    stopped_at = counter.inputs
    time.sleep(0.5)
    print(f"\ndeparted client: {stopped_at} of {len(texts)} inputs tokenized before the work stopped")
    assert counter.inputs == stopped_at, "tokenization went on after its capacity was given back"
    assert stopped_at < len(texts) // 2
    start = time.monotonic()
    r = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": "猫が寝ている"}, timeout=30)
    assert r.status_code == 200 and time.monotonic() - start < 2.0


def test_a_storm_of_abandoned_requests_leaves_little_work_and_health_answers(counted_server):
    server, counter = counted_server
    body = {"model": EMBED, "input": [LONG[:400]] * 2048}  # seconds of tokenization each
    sent = 20

    async def storm() -> list[float]:
        payload = json.dumps(body).encode()
        host, port = server.url.removeprefix("http://").split(":")
        request = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload

        async def abandoned() -> None:
            # The whole request is sent, then the client leaves 30 ms later, as an impatient client does.
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            await writer.drain()
            await asyncio.sleep(0.03)
            writer.close()

        async def probe() -> float:
            async with httpx.AsyncClient(timeout=30) as http:  # a new connection each time, as a prober makes
                start = time.monotonic()
                assert (await http.get(server.url + "/health")).status_code == 200
                return time.monotonic() - start

        async def clients() -> None:
            tasks = []
            for _ in range(sent):  # one every 50 ms: each reaches its handler before it leaves
                tasks.append(asyncio.create_task(abandoned()))
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)

        load = asyncio.create_task(clients())
        waits = []
        while not load.done():
            await asyncio.sleep(0.1)
            waits.append(await probe())
        await load
        return waits

    waits = asyncio.run(storm())
    deadline = time.monotonic() + 20
    while _in_flight(server.url) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(3)  # work that outlived its admission would show here
    share = counter.inputs / (sent * 2048)
    print(f"\nstorm: {share:.1%} of abandoned inputs tokenized; slowest /health {max(waits) * 1000:.0f} ms")
    assert share < 0.05
    assert max(waits) < 1.0

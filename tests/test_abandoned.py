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

from helpers import EMBED, EMBED_V3, ServerThread

LONG = "東京は日本の首都で、多くの人が電車で通勤しています。" * 80  # ~2,000 characters, as in the report


class Counting:
    """Wraps a tokenizer's encode to count the inputs it was given."""

    def __init__(self, encode):
        self.encode = encode
        self.inputs = 0

    def __call__(self, texts, *args, **kwargs):
        self.inputs += len(texts)
        return self.encode(texts, *args, **kwargs)


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


async def test_a_round_whose_clients_all_left_stops_at_its_next_run(exported):
    # Every model shares one inference thread: a departed client's round ran to its end, and a small request for
    # another model waited behind it (10.7 s where 0.06 s is the norm, review of 2026-11-27).
    backend = EmbeddedBackend(exported["repository"])
    await backend.start()
    try:
        model = backend.models[EMBED_V3]
        engine_runs: list[int] = []
        run_many = model.encoder.run_many

        def slow(feeds):
            engine_runs.append(len(feeds))
            time.sleep(0.1)  # a run of a large model
            return run_many(feeds)

        model.encoder.run_many = slow
        texts = [f"{i}: 東京は日本の首都です。" for i in range(320)]  # 32 rows a run on a CPU: 10 runs or more
        task = asyncio.create_task(backend.embed(model.spec, texts=texts))
        while not engine_runs:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)
        stopped = len(engine_runs)
        assert stopped <= 2, engine_runs
        # The model still serves, whole rounds included (40 rows: two runs).
        out = await backend.embed(model.spec, texts=texts[:40])
        assert out.values.shape[0] == 40 and len(engine_runs) - stopped >= 2
    finally:
        await backend.close()

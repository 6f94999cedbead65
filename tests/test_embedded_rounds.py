"""The embedded backend's rounds: an engine error on one request's input, what the encoder's counters say of rounds
that failed or were left, and a request larger than a round."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import numpy as np
import pytest

from fos_runtime import batching
from fos_runtime.tokenization import Encoded
from shim.backends.embedded import EmbeddedBackend

from helpers import EMBED, EMBED_V3


@contextlib.asynccontextmanager
async def started(repository, **options):
    backend = EmbeddedBackend(repository, **options)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


POISON = 77  # a token id the engine "fails" on, as one did on a shape after a memory release (OpenVINO 2026.4.1)


async def test_in_a_failed_round_only_the_request_at_fault_fails(exported):
    async with started(exported["repository"]) as backend:
        model = backend.models[EMBED_V3]
        run_many = model.encoder.run_many
        held = threading.Event()

        def failing(feeds):
            held.wait(10)  # the first round holds the encoder while the others queue into one round
            if any((f["input_ids"] == POISON).any() for f in feeds):
                raise RuntimeError("the engine failed on this input")
            return run_many(feeds)

        model.encoder.run_many = failing
        rows = [[1, 20 + i, 30, 2] for i in range(3)]
        rows[1][2] = POISON

        def embed(ids):
            return asyncio.create_task(backend.embed(model.spec, encoded=Encoded(input_ids=ids)))

        first = embed([[1, 11, 2]])
        while not model.rounds.stats.rounds:
            await asyncio.sleep(0.01)
        others = [embed([row]) for row in rows]
        await asyncio.sleep(0.1)
        rounds = model.rounds.stats.rounds
        held.set()
        await first
        results = await asyncio.gather(*others, return_exceptions=True)
        assert model.rounds.stats.rounds == rounds + 1  # the three shared one round
        assert isinstance(results[1], RuntimeError)
        for k in (0, 2):
            alone = await backend.embed(model.spec, encoded=Encoded(input_ids=[rows[k]]))
            assert np.allclose(results[k].values, alone.values, atol=1e-6)


async def test_runs_of_a_round_that_failed_or_was_left_are_counted(exported):
    async with started(exported["repository"]) as backend:
        model = backend.models[EMBED_V3]
        run_many = model.encoder.run_many
        runs = 0

        def second_fails(feeds):
            nonlocal runs
            runs += 1
            if runs == 2:
                raise RuntimeError("the engine failed")
            return run_many(feeds)

        model.encoder.run_many = second_fails
        texts = [f"{i}: 東京は日本の首都です。" for i in range(80)]  # two runs or more on a CPU
        with pytest.raises(RuntimeError):
            await backend.embed(model.spec, texts=texts)
        counted = backend.stats()[EMBED_V3]
        assert counted.encoder_runs == 1 and (counted.encoder_seconds or 0) > 0


async def test_a_request_past_the_round_budget_goes_in_pieces_and_others_get_in_between(exported):
    # One request of 256 long inputs held every other model's requests for its whole 6 s (review, 2026-11-28).
    texts = [f"{i}: " + "東京は日本の首都です。" * (1 + i % 3) for i in range(40)]
    small_rounds = dataclasses.replace(batching.plan_for("cpu"), round_tokens=64)
    async with started(exported["repository"]) as whole, started(exported["repository"], plan=small_rounds) as cut:
        expected = (await whole.embed(whole.models[EMBED_V3].spec, texts=texts)).values
        model, other = cut.models[EMBED_V3], cut.models[EMBED]
        run_many = model.encoder.run_many
        order: list[str] = []

        def slow(feeds):
            time.sleep(0.05)  # a run of a large model
            return run_many(feeds)

        model.encoder.run_many = slow
        large = asyncio.create_task(cut.embed(model.spec, texts=texts))
        while not model.rounds.stats.rounds:
            await asyncio.sleep(0.01)
        large.add_done_callback(lambda _: order.append("large"))
        await cut.embed(other.spec, texts=["猫"])
        order.append("small")
        got = (await large).values
        assert order == ["small", "large"]
        assert model.rounds.stats.rounds >= 4  # the pieces: each its own round
        assert np.allclose(got, expected, atol=1e-5)


async def test_one_models_tokenization_does_not_hold_anothers(exported):
    # The models shared two tokenizer threads: two chunks of one model held both (one waiting for that tokenizer's
    # lock) while another model's one query waited behind them.
    async with started(exported["repository"]) as backend:
        busy, other = backend.models[EMBED], backend.models[EMBED_V3]
        encode = busy.tokenizer.encode

        def slow(*args):
            time.sleep(0.4)
            return encode(*args)

        busy.tokenizer.encode = slow
        start = time.perf_counter()
        held = [asyncio.create_task(busy.tokenize(["猫"], None, False)) for _ in range(2)]
        await asyncio.sleep(0.05)
        await other.tokenize(["犬"], None, False)
        waited = time.perf_counter() - start
        await asyncio.gather(*held)
    assert waited < 0.3, waited


async def test_no_run_outlives_the_backend(exported):
    # close() left a round computing on its thread, and the encoder's stream threads for good.
    engine_runs: list[int] = []
    before = set(threading.enumerate())  # a session's servers hold threads of these names too
    backend = EmbeddedBackend(exported["repository"], streams=2)
    await backend.start()
    model = backend.models[EMBED]
    run_many = model.encoder.run_many

    active = [0]

    def slow(feeds):
        active[0] += 1
        engine_runs.append(len(feeds))
        time.sleep(0.2)
        try:
            return run_many(feeds)
        finally:
            active[0] -= 1

    model.encoder.run_many = slow
    task = asyncio.create_task(backend.embed(model.spec, texts=[f"{i}: 東京は日本の首都です。" for i in range(2000)]))
    while not engine_runs:
        await asyncio.sleep(0.01)
    await backend.close()
    assert active == [0]  # the run in progress ended before close() returned
    ran = len(engine_runs)
    with pytest.raises(asyncio.CancelledError):
        await task
    time.sleep(0.3)
    assert len(engine_runs) == ran <= 2
    ours = set(threading.enumerate()) - before
    alive = [t.name for t in ours if t.name.startswith(("fos-infer", "fos-stream", "fos-tokenize"))]
    assert alive == []

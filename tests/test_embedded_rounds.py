"""The embedded backend's rounds when something goes wrong: an engine error on one request's input, and what the
encoder's counters say of rounds that failed or were left."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from fos_runtime.tokenization import Encoded
from shim.backends.embedded import EmbeddedBackend

from helpers import EMBED_V3

POISON = 77  # a token id the engine "fails" on, as one did on a shape after a memory release (OpenVINO 2026.4.1)


async def test_in_a_failed_round_only_the_request_at_fault_fails(exported):
    backend = EmbeddedBackend(exported["repository"])
    await backend.start()
    try:
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
    finally:
        await backend.close()


async def test_runs_of_a_round_that_failed_or_was_left_are_counted(exported):
    backend = EmbeddedBackend(exported["repository"])
    await backend.start()
    try:
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
    finally:
        await backend.close()

"""The Triton backend: gRPC (tritonclient.grpc.aio) to the ensembles that export wrote.

Text goes to the ensemble (tokenized inside Triton); token-id input goes straight to the encoder.
A large client batch is split into sub-requests of similar length, sent concurrently and put back
in input order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from ..errors import BackendFailed, BackendUnavailable
from ..repository import spec_of
from ..runtime import spec as specs
from ..runtime.spec import ModelSpec
from ..runtime.tokenization import Encoded, length_batches, pad

log = logging.getLogger("fos.triton")

SUB_BATCH = 32  # inputs per sub-request; below the models' max_batch_size
TIMEOUT_S = 60.0  # deadline of every Triton call


def _strings(name: str, values: Sequence[str]) -> grpcclient.InferInput:
    arr = np.array([[v.encode("utf-8")] for v in values], dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(arr.shape), "BYTES")
    tensor.set_data_from_numpy(arr)
    return tensor


def _ints(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(arr.shape), "INT64")
    tensor.set_data_from_numpy(arr)
    return tensor


class TritonBackend:
    def __init__(self, url: str, timeout_s: float = TIMEOUT_S):
        self.url = url
        self.timeout_s = timeout_s
        self.client: grpcclient.InferenceServerClient | None = None  # made in start(): grpc.aio binds to the loop
        self._specs: dict[str, ModelSpec] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.url)
        try:
            await self._discover()
        except Exception as exc:  # Triton may come up later: /health says so meanwhile
            log.warning("Triton at %s not usable yet: %s", self.url, exc)

    async def _discover(self) -> None:
        async with self._lock:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
            found: dict[str, ModelSpec] = {}
            for entry in index.get("models", []):
                if entry.get("state") != "READY":
                    continue
                response = await self.client.get_model_config(entry["name"], client_timeout=self.timeout_s)
                s = spec_of(response.config)
                if s is not None:
                    found[s.served_name] = s
            self._specs = found
            log.info("Triton at %s serves %s", self.url, sorted(found) or "no exported models")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def ready(self) -> bool:
        try:
            if not await self.client.is_server_ready(client_timeout=5.0):
                return False
            if not self._specs:
                await self._discover()
            for s in self._specs.values():
                if not await self.client.is_model_ready(s.name, client_timeout=5.0):
                    return False
            return bool(self._specs)
        except Exception:
            return False

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    async def _infer(self, model: str, inputs: list, outputs: list[str]) -> list[np.ndarray]:
        try:
            result = await self.client.infer(
                model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            status = (exc.status() or "").upper()
            if "UNAVAILABLE" in status or "DEADLINE" in status or "NOT_FOUND" in status:
                raise BackendUnavailable(f"Triton is unavailable: {exc.message()}") from exc
            raise BackendFailed(f"Triton failed: {exc.message()}") from exc
        return [result.as_numpy(o) for o in outputs]

    async def embed(
        self, s: ModelSpec, texts: Sequence[str] | None = None, encoded: Encoded | None = None
    ) -> tuple[np.ndarray, list[int]]:
        if encoded is not None:
            return await self._embed_ids(s, encoded), encoded.lengths
        texts = list(texts or [])
        # Characters stand in for tokens when grouping by length; Triton tokenizes.
        groups = length_batches([len(t) for t in texts], SUB_BATCH, max_tokens=1 << 30)
        parts = await asyncio.gather(
            *(self._infer(s.name, [_strings(specs.TEXT, [texts[i] for i in g])], [specs.EMBEDDING, specs.NUM_TOKENS]) for g in groups)
        )
        vectors = np.empty((len(texts), s.dimension), dtype=np.float32)
        counts = np.zeros(len(texts), dtype=np.int64)
        for g, (vec, num) in zip(groups, parts):
            vectors[g] = vec
            counts[g] = num.reshape(-1)
        return vectors, counts.tolist()

    async def _embed_ids(self, s: ModelSpec, encoded: Encoded) -> np.ndarray:
        groups = length_batches(encoded.lengths, SUB_BATCH, max_tokens=1 << 30)

        def request(g: list[int]):
            feeds = pad(encoded, s.pad_token_id, s.encoder_inputs, order=g)
            return self._infer(specs.encoder_model(s.name), [_ints(n, a) for n, a in feeds.items()], [specs.EMBEDDING])

        parts = await asyncio.gather(*(request(g) for g in groups))
        vectors = np.empty((len(encoded.input_ids), s.dimension), dtype=np.float32)
        for g, (vec,) in zip(groups, parts):
            vectors[g] = vec
        return vectors

    async def rerank(self, s: ModelSpec, query: str, documents: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        docs = list(documents)
        groups = length_batches([len(d) for d in docs], SUB_BATCH, max_tokens=1 << 30)
        parts = await asyncio.gather(
            *(
                self._infer(
                    s.name,
                    [_strings(specs.TEXT, [query] * len(g)), _strings(specs.TEXT_PAIR, [docs[i] for i in g])],
                    [specs.SCORE, specs.NUM_TOKENS],
                )
                for g in groups
            )
        )
        scores = np.empty(len(docs), dtype=np.float32)
        counts = np.zeros(len(docs), dtype=np.int64)
        for g, (score, num) in zip(groups, parts):
            scores[g] = score.reshape(-1)
            counts[g] = num.reshape(-1)
        return scores, counts.tolist()

"""The wire-agnostic service: validates requests against the served model, calls the backend and
shapes the answers. Routes call this, never a backend."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable

import numpy as np

from fos_runtime.spec import ModelSpec
from fos_runtime.text import blank, clean
from fos_runtime.tokenization import truncate_ids

from .backends.base import Backend, Output
from .errors import BackendUnavailable, InvalidRequest, ModelNotFound, NonFiniteOutput, Overloaded
from .observability import Metrics
from .protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Ranking,
    RerankDocument,
    RerankRequest,
    RerankV2Request,
)

log = logging.getLogger("fos.service")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request bounds; each breach is a 400 naming the parameter."""

    max_inputs: int = 2048  # inputs per embeddings request (OpenAI's limit)
    max_input_chars: int = 50_000  # characters per input, before truncation to the model's tokens
    max_documents: int = 1000  # documents per rerank request
    # Inputs (texts, documents) admitted and not yet answered, over all requests. Past it: 429 with
    # Retry-After, never an unbounded queue: the work held stays bounded under any load. Bodies are read and
    # parsed before they are counted (while the server is not full), each at most max_body_bytes: ten
    # concurrent 17.7 MB bodies took 223 MB more for as long as they were parsed (review).
    max_inputs_in_flight: int = 8192
    max_body_bytes: int = 32 << 20  # request body
    # Inputs longer than the model's context are cut (Dify never truncates and expects the server
    # to); False rejects them unless the request itself sends truncate=true.
    truncate: bool = True

    def never_admitted(self) -> list[str]:
        """Per-request limits above the admission capacity: requests that big are refused with a 400."""
        return [
            f"--{name.replace('_', '-')} {value} is above --max-inputs-in-flight {self.max_inputs_in_flight}: "
            f"requests with more than {self.max_inputs_in_flight} inputs will be refused"
            for name, value in (("max_inputs", self.max_inputs), ("max_documents", self.max_documents))
            if value > self.max_inputs_in_flight
        ]


class Admission:
    """Counts admitted work; the event loop is single-threaded, so no lock is needed."""

    def __init__(self, capacity: int, metrics: Metrics | None = None):
        self.capacity = capacity
        self.in_flight = 0
        self.metrics = metrics

    def check(self, n: int) -> None:
        if self.in_flight + n > self.capacity:
            if self.metrics:
                self.metrics.rejected.inc()
            raise Overloaded(f"the server is busy ({self.in_flight} inputs in flight); retry shortly")

    @contextlib.contextmanager
    def admit(self, n: int):
        """Holds ``n`` inputs of capacity until the block ends; backends end it only once their work for the
        request has stopped (a departed client's included), so the count is the work really running."""
        self.check(n)
        self.in_flight += n
        if self.metrics:
            self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= n
            if self.metrics:
                self.metrics.in_flight.set(self.in_flight)


class Service:
    def __init__(
        self, backend: Backend, limits: Limits | None = None, metrics: Metrics | None = None, admission: Admission | None = None
    ):
        self.backend = backend
        self.limits = limits or Limits()
        self.metrics = metrics
        self.admission = admission or Admission(self.limits.max_inputs_in_flight, metrics)
        for warning in self.limits.never_admitted():
            log.warning(warning)

    def _count(self, s: ModelSpec, out: Output) -> None:
        if self.metrics:
            self.metrics.inputs.labels(s.served_name).inc(len(out.tokens))
            self.metrics.tokens.labels(s.served_name).inc(int(sum(out.tokens)))
            self.metrics.truncated.labels(s.served_name).inc(sum(out.truncated))

    async def _has_models(self) -> bool:
        """Whether the backend serves models; with none known yet it is asked again (ready() rediscovers Triton's)."""
        return bool(self.backend.specs()) or await self.backend.ready()

    @staticmethod
    def _unavailable() -> BackendUnavailable:
        return BackendUnavailable("no model is ready: the models are loading or the inference server is unreachable")

    @staticmethod
    def _not_found(name: str, served: Iterable[str]) -> ModelNotFound:
        return ModelNotFound(f"The model `{name}` does not exist. Served: {', '.join(sorted(served)) or 'none'}", param="model")

    async def resolve(self, name: str | None, task: str) -> ModelSpec:
        if not await self._has_models():
            raise self._unavailable()
        served = {s.served_name: s for s in self.backend.specs()}
        if name is None:
            of_task = [s for s in served.values() if s.task == task]
            if len(of_task) == 1:
                return of_task[0]
            names = ", ".join(sorted(s.served_name for s in of_task))
            raise InvalidRequest(f"'model' is required: this server has {len(of_task)} {task} models ({names})", param="model")
        s = served.get(name)
        if s is None:
            raise self._not_found(name, served)
        if s.task != task:
            other = "/v1/rerank" if s.task == "rerank" else "/v1/embeddings"
            raise InvalidRequest(f"The model `{name}` is a {s.task} model; use {other}", param="model", code="wrong_task")
        return s

    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        s = await self.resolve(req.model, "embed")
        if req.dimensions is not None and req.dimensions != s.dimension:
            raise InvalidRequest(
                f"`{s.served_name}` returns {s.dimension} dimensions; dimensions={req.dimensions} is not supported",
                param="dimensions",
            )

        raw = req.input
        truncate = self._truncate(req.truncate)
        if isinstance(raw, str):
            raw = [raw]
        if len(raw) == 0:
            raise InvalidRequest("'input' must not be empty", param="input")
        if len(raw) > self.limits.max_inputs and not isinstance(raw[0], int):
            raise InvalidRequest(f"'input' has {len(raw)} items; at most {self.limits.max_inputs} per request", param="input")
        self._admissible(1 if isinstance(raw[0], int) else len(raw), "input")
        if isinstance(raw[0], str):
            texts = [self._text(t, f"input[{i}]", "input") for i, t in enumerate(raw)]
            texts = s.with_prompt(texts, self._prompt_name(s, req))
            with self.admission.admit(len(texts)):
                # Detected even where allowed, for fos_truncated_inputs: it re-tokenizes only inputs that fill the context.
                out = await self.backend.embed(s, texts=texts, detect_truncation=True)
        else:
            seqs = [raw] if isinstance(raw[0], int) else raw
            if req.input_type is not None or req.prompt_name is not None:
                param = "input_type" if req.input_type is not None else "prompt_name"
                raise InvalidRequest(f"{param} applies to text input, not token ids", param=param)
            self._check_ids(s, seqs)
            encoded = truncate_ids(seqs, s.max_length, s.end_token_id)
            self._check_truncation(s, encoded.cut, truncate, "input", "input[{}]")  # known before any compute
            with self.admission.admit(len(seqs)):
                out = await self.backend.embed(s, encoded=encoded)
        self._check_truncation(s, out.truncated, truncate, "input", "input[{}]")
        self._check_finite(s, out.values, "input[{}]")
        self._count(s, out)
        vectors = out.values

        if s.normalize and not s.model_normalizes:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return EmbeddingResponse.of(s.served_name, vectors, req.encoding_format, int(sum(out.tokens)))

    def _admissible(self, n: int, param: str) -> None:
        """A request larger than the admission capacity would get 429 "retry shortly" forever, even
        on an idle server: it is a 400 instead, naming the limit."""
        capacity = self.limits.max_inputs_in_flight
        if n > capacity:
            raise InvalidRequest(
                f"'{param}' has {n} items; this server admits at most {capacity} inputs at once "
                "(--max-inputs-in-flight), so send fewer per request",
                param=param,
            )

    def _text(self, text: str, what: str, param: str) -> str:
        """Every text the service accepts passes here: refused if it says nothing or is too long,
        else cleaned of control characters (``fos_runtime.text``). The backends' tokenizers clean
        too; this also covers a Triton repository exported before that rule."""
        if blank(text):
            raise InvalidRequest(f"{what} is empty or has only whitespace, control or format characters", param=param)
        if len(text) > self.limits.max_input_chars:
            raise InvalidRequest(f"{what} has {len(text)} characters; at most {self.limits.max_input_chars}", param=param)
        return clean(text)

    @staticmethod
    def _prompt_name(s: ModelSpec, req: EmbeddingRequest) -> str | None:
        """input_type, or TEI's prompt_name for it; None: the model's default prompt."""
        if req.input_type is not None and req.prompt_name is not None and req.input_type != req.prompt_name:
            raise InvalidRequest("input_type and prompt_name name different prompts; send one", param="prompt_name")
        name, param = (req.input_type, "input_type") if req.input_type is not None else (req.prompt_name, "prompt_name")
        if name is not None and name not in s.prompts:
            known = ", ".join(repr(k) for k in sorted(s.prompts)) or "none"
            raise InvalidRequest(f"{param} {name!r} is not a prompt of `{s.served_name}` (its prompts: {known})", param=param)
        return name

    @staticmethod
    def _check_finite(s: ModelSpec, values: np.ndarray, item: str) -> None:
        """A NaN or infinity (an overflow, fp16's most likely) would go out as JSON null, or scramble a ranking:
        a server error that names the input instead."""
        bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
        if len(bad):
            where = item.format(int(bad[0]))
            log.error("%s computed non-finite values for %d of %d inputs, first %s", s.served_name, len(bad), len(values), where)
            raise NonFiniteOutput(
                f"`{s.served_name}` computed non-finite values (NaN or infinity) for {where}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                + ("; fp16 overflowed on this input: an fp32 export would not" if s.precision == "fp16" else "")
            )

    def _check_ids(self, s: ModelSpec, seqs: list[list[int]]) -> None:
        for i, seq in enumerate(seqs):
            if not seq:
                raise InvalidRequest(f"input[{i}] is an empty list of tokens", param="input")
            if len(seq) > self.limits.max_input_chars:
                raise InvalidRequest(f"input[{i}] has {len(seq)} tokens; at most {self.limits.max_input_chars}", param="input")
            bad = next((t for t in seq if t < 0 or t >= s.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(
                    f"input[{i}] has token id {bad}, outside the vocabulary (0..{s.vocab_size - 1})", param="input"
                )
            if s.start_token_id is not None and seq[0] != s.start_token_id:
                raise InvalidRequest(
                    f"input[{i}] starts with token id {seq[0]}, not {s.start_token_id}, the special token "
                    f"`{s.served_name}`'s tokenizer opens every input with: token ids must be the model's own, special "
                    "tokens included, or send the text (LangChain's OpenAIEmbeddings sends tiktoken's ids unless "
                    "check_embedding_ctx_length=False)",
                    param="input",
                )

    def _truncate(self, asked: bool | None) -> bool:
        return self.limits.truncate if asked is None else asked

    @staticmethod
    def _check_truncation(s: ModelSpec, truncated: list[bool], truncate: bool, param: str, what: str) -> None:
        """For text, known only once the backend has tokenized (inside Triton); the request then fails
        as a whole rather than answer for a text the model never saw in full."""
        if truncate or not any(truncated):
            return
        first = truncated.index(True)
        raise InvalidRequest(
            f"{what.format(first)} is longer than the {s.max_length} tokens `{s.served_name}` takes, and truncation is off; "
            "shorten it or send truncate=true",
            param=param,
            code="context_length_exceeded",
        )

    async def rerank(self, req: RerankRequest | RerankV2Request) -> Ranking:
        s = await self.resolve(req.model, "rerank")
        query = self._text(req.query, "'query'", "query")
        if not req.documents:
            raise InvalidRequest("'documents' must not be empty", param="documents")
        if len(req.documents) > self.limits.max_documents:
            raise InvalidRequest(
                f"'documents' has {len(req.documents)} items; at most {self.limits.max_documents} per request", param="documents"
            )
        self._admissible(len(req.documents), "documents")
        docs = [d.text if isinstance(d, RerankDocument) else d for d in req.documents]
        truncate = self._truncate(req.truncate)
        cleaned = [self._text(d, f"documents[{i}]", "documents") for i, d in enumerate(docs)]
        (query,) = s.with_prompt([query], None)  # a cross-encoder's default prompt, as CrossEncoder.predict
        with self.admission.admit(len(docs)):
            # A cap past the context cuts nothing; past int64 it would not reach the tokenizer.
            cap = min(req.max_tokens_per_doc, s.max_length) if req.max_tokens_per_doc is not None else None
            out = await self.backend.rerank(s, query, cleaned, detect_truncation=True, max_doc_tokens=cap)
        self._check_truncation(s, out.truncated, truncate, "documents", "'query' with documents[{}]")
        self._check_finite(s, out.values, "'query' with documents[{}]")
        self._count(s, out)
        scores = [float(x) for x in out.values]
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))
        if req.top_n is not None:
            order = order[: req.top_n]
        return Ranking(model=s.served_name, order=order, scores=scores, documents=docs, tokens=int(sum(out.tokens)))

    async def model(self, name: str) -> ModelCard:
        if not name:  # /v1/models/: a 404 of this operation, not the list of another (its answer is one card)
            raise ModelNotFound("name a model: /v1/models/{id}; GET /v1/models lists them", param="model")
        if not await self._has_models():  # a model not known yet may be loading: a 503, as for inference
            raise self._unavailable()
        cards = self.models().data
        card = next((c for c in cards if c.id == name), None)
        if card is None:
            raise self._not_found(name, (c.id for c in cards))
        return card

    def models(self) -> ModelList:
        running = self.backend.engines()
        cards = []
        for s in sorted(self.backend.specs(), key=lambda s: s.served_name):
            engine = running.get(s.served_name)
            cards.append(
                ModelCard(
                    id=s.served_name,
                    task=s.task,
                    max_length=s.max_length,
                    dimension=s.dimension if s.task == "embed" else None,
                    prompts=s.prompts or None,
                    default_prompt_name=s.default_prompt_name,
                    precision=s.precision,
                    engine=engine.choice.engine if engine else None,
                    compute_precision=engine.choice.compute if engine else None,
                    engine_threads=engine.threads if engine else None,
                    engine_streams=engine.streams if engine else None,
                )
            )
        return ModelList(data=cards)

"""Wire types: OpenAI embeddings, Cohere/Jina-style rerank (Cohere's v1 and v2), model list, and the
error envelope.

Requests are validated here; each response type builds itself from the service's wire-agnostic
result (``of``), so every wire format is shaped in exactly one place.
"""

from __future__ import annotations

import base64
import dataclasses
import uuid
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema
from starlette.responses import Response

from fos_runtime.text import encodable

# Constraints in the types, so the OpenAPI document says what the server accepts.
# JSON lets a string carry half of a UTF-16 pair (a client cut it inside an emoji); UTF-8 cannot, so a response
# echoing it (a document, a model name in an error) could not be written: every string the server reads or echoes
# is made encodable as it is validated (fos_runtime.text).
Name = Annotated[StrictStr, AfterValidator(encodable)]
# Not empty, as documented; whether a text says anything (not only spaces, control or format
# characters) is checked by the service, which names the input at fault (fos_runtime.text).
Text = Annotated[StrictStr, AfterValidator(encodable), WithJsonSchema({"type": "string", "minLength": 1})]
TokenId = Annotated[StrictInt, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Request(BaseModel):
    # Clients send fields we do not use (user, truncate, ...): ignore them, as OpenAI does.
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Request):
    model: Name | None = Field(None, description="Served model name; may be left out when one embedding model is served")
    input: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)] = Field(
        ..., description="Text, texts, token ids, or lists of token ids (the model's own vocabulary, special tokens included)"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, description="Must equal the model's dimension if given")
    input_type: Name | None = Field(
        None,
        description="Extension: the name of the model's prompt to put before each text, as sentence-transformers' "
        "prompt_name (ruri v3: 'query', 'document', 'topic'); default: the model's default prompt, if any. "
        "A text that already starts with one of the model's prompts gets none",
    )
    prompt_name: Name | None = Field(None, description="Extension (TEI): another spelling of input_type")
    user: StrictStr | None = None
    truncate: StrictBool | None = Field(
        None,
        description="Extension (TEI): false rejects an input longer than the model's context instead of cutting it; "
        "default: the server's setting (cut)",
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage

    @classmethod
    def of(cls, model: str, vectors: np.ndarray, encoding_format: str, tokens: int) -> EmbeddingResponse:
        if encoding_format == "base64":  # little-endian float32, what the openai client decodes
            data: list = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.tolist()
        return cls(
            data=[Embedding(embedding=e, index=i) for i, e in enumerate(data)],
            model=model,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )


class RerankDocument(_Request):
    text: Text


class _RerankFields(_Request):
    model: Name | None = Field(None, description="Served model name; may be left out when one reranker is served")
    query: Text
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the best n results")
    truncate: StrictBool | None = Field(
        None, description="Extension (TEI): false rejects a pair longer than the model's context instead of cutting it"
    )
    max_tokens_per_doc: StrictInt | None = Field(
        None, ge=1, description="Cohere v2: cut each document to this many tokens first; default: only the model's context"
    )


class RerankRequest(_RerankFields):
    """Cohere v1, Jina, Dify and TEI-style rerank."""

    documents: Annotated[list[Text | RerankDocument], Field(min_length=1)]
    return_documents: StrictBool = False


class RerankV2Request(_RerankFields):
    """Cohere's v2 rerank: documents are strings, and results never carry them."""

    documents: Annotated[list[Text], Field(min_length=1)]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


@dataclasses.dataclass
class Ranking:
    """What the service found, before any wire format: documents best first, cut to top_n."""

    model: str
    order: list[int]  # document indices, best first
    scores: list[float]  # per document, in request order
    documents: list[str]  # the texts, in request order
    tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage

    @classmethod
    def of(cls, ranking: Ranking, return_documents: bool) -> RerankResponse:
        return cls(
            id=uuid.uuid4().hex,
            model=ranking.model,
            results=[
                RerankResult(
                    index=i,
                    relevance_score=ranking.scores[i],
                    document=RerankDocument(text=ranking.documents[i]) if return_documents else None,
                )
                for i in ranking.order
            ],
            usage=RerankUsage(prompt_tokens=ranking.tokens, total_tokens=ranking.tokens),
        )


class RerankV2Result(BaseModel):
    index: int
    relevance_score: float


class ApiVersion(BaseModel):
    version: str = "2"


class InputTokens(BaseModel):
    input_tokens: int


class RerankV2Meta(BaseModel):
    api_version: ApiVersion
    tokens: InputTokens


class RerankV2Response(BaseModel):
    """Cohere's ``V2RerankResponse``."""

    id: str
    results: list[RerankV2Result]
    meta: RerankV2Meta

    @classmethod
    def of(cls, ranking: Ranking) -> RerankV2Response:
        return cls(
            id=uuid.uuid4().hex,
            results=[RerankV2Result(index=i, relevance_score=ranking.scores[i]) for i in ranking.order],
            meta=RerankV2Meta(api_version=ApiVersion(), tokens=InputTokens(input_tokens=ranking.tokens)),
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fake-openai-server"
    task: Literal["embed", "rerank"]
    max_length: int
    dimension: int | None = None
    prompts: dict[str, str] | None = None  # by name, what input_type may pick
    default_prompt_name: str | None = None
    precision: str = Field(description="What the exported ONNX file holds: fp32, fp16 or int8")
    engine: str | None = Field(None, description="What runs the encoder (onnxruntime, openvino); known in process only")
    compute_precision: str | None = Field(
        None, description="The precision the engine computes in: the export's, or bf16 / int8 by OpenVINO on an fp32 export"
    )
    engine_threads: int | None = Field(None, description="Threads each of the engine's runs uses; known in process only")
    engine_streams: int | None = Field(None, description="Runs the engine computes at once (--engine-streams)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class JSON(Response):
    """A response model rendered by pydantic's own serializer: no re-validation by FastAPI, and no
    pass through Python's json module (vectors of 1,024 floats are the bulk of every answer)."""

    media_type = "application/json"

    def render(self, content: BaseModel) -> bytes:
        return content.model_dump_json(exclude_none=True).encode()


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

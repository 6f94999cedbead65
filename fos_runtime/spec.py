"""The one source of truth for tensor names, model names and the metadata of a served model.

Export renders every ``config.pbtxt`` from these names, the Triton Python models read them, and the
shim's Triton client uses them: nothing else spells a tensor name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

# Ensemble (client-facing) tensors.
TEXT = "TEXT"
TEXT_PAIR = "TEXT_PAIR"
NUM_TOKENS = "NUM_TOKENS"  # tokens the input was computed with
TRUNCATED = "TRUNCATED"  # whether the input was cut to max_length (only when DETECT_TRUNCATION is sent)
DETECT_TRUNCATION = "DETECT_TRUNCATION"  # optional input: tell which inputs were cut (costs a second tokenization)
MAX_DOC_TOKENS = "MAX_DOC_TOKENS"  # optional rerank input: cut each document to this many tokens first
EMBEDDING = "EMBEDDING"
SCORE = "SCORE"


def output_tensor(task: str) -> str:
    """The graph's and the ensemble's output: embed's vectors or rerank's scores."""
    return EMBEDDING if task == "embed" else SCORE


# Encoder tensors. Their names are also the ONNX graph's input names and the HF tokenizer's keys.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
ENCODER_INPUTS_ALL = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)

# The config.pbtxt parameter that carries ModelSpec as JSON (ensemble and tokenizer models).
SPEC_PARAMETER = "fos_spec"

TOKENIZER_SUFFIX = "__tokenizer"
ENCODER_SUFFIX = "__encoder"

Task = Literal["embed", "rerank"]
TASKS: tuple[str, ...] = ("embed", "rerank")

_TRITON_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def triton_name(served_name: str) -> str:
    """Map a served name such as ``cl-nagoya/ruri-large`` to a Triton model name.

    Triton names are directory names, so ``/`` becomes ``--`` (the Hugging Face cache's convention).
    """
    name = served_name.strip().replace("/", "--")
    if not _TRITON_NAME.match(name) or name.endswith((TOKENIZER_SUFFIX, ENCODER_SUFFIX)):
        raise ValueError(f"cannot serve a model named {served_name!r}: use letters, digits, '/', '-', '_', '.'")
    return name


def default_served_name(model: str) -> str:
    """The HF id as it is (so Dify's model name is the seed's); a local directory's own name."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def tokenizer_model(name: str) -> str:
    return name + TOKENIZER_SUFFIX


def encoder_model(name: str) -> str:
    return name + ENCODER_SUFFIX


# Where export writes a model's files in a repository, and every reader finds them (``name``: ModelSpec.name).
def tokenizer_files(repository: Path, name: str) -> Path:
    return Path(repository) / tokenizer_model(name) / "1" / "tokenizer"


def encoder_file(repository: Path, name: str) -> Path:
    return Path(repository) / encoder_model(name) / "1" / "model.onnx"


# Beside an int8 export's model.onnx (onnxruntime's dynamic quantization, which OpenVINO cannot read): OpenVINO's own
# int8 of the same fp32 graph (NNCF's static quantization), as OpenVINO IR (.xml + .bin).
OPENVINO_INT8_FILE = "openvino-int8.xml"


def openvino_int8_file(onnx_file: Path) -> Path:
    return Path(onnx_file).with_name(OPENVINO_INT8_FILE)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the shim needs to know about one exported model; written once by export."""

    served_name: str
    task: Task
    source: str  # the HF id or directory it was exported from
    max_length: int  # tokens, special tokens included; longer inputs are truncated
    encoder_inputs: tuple[str, ...]  # which of ENCODER_INPUTS_ALL the ONNX graph takes
    pad_token_id: int
    vocab_size: int
    precision: str = "fp32"  # what the exported ONNX file holds (an engine may compute in bf16 from fp32: engine)
    device: str = "cpu"  # where Triton runs the encoder; picks the batching plan (fos_runtime.batching)
    # Triton's encoder takes requests of any rows and lengths together and regroups them itself (the Python-backend
    # encoder, ragged batching). False: each request runs as it comes (ONNX Runtime, OpenVINO or TensorRT backend),
    # so on a GPU the shim cuts its rounds into calls of bucketed row counts, or every round would be a new shape.
    ragged: bool = False
    # What runs the encoder in process and in Triton's Python encoder, one of fos_runtime.engines.CHOICES, resolved
    # where it runs (auto: by the CPU's features); fos serve --engine overrides it.
    engine: str = "auto"
    dimension: int = 0  # embed only
    normalize: bool = True  # embed: the shim L2-normalises (OpenAI, TEI); False returns raw vectors
    model_normalizes: bool = False  # the model itself ends with a Normalize module
    # Prompt name (a request's input_type) -> the text put before the input, as sentence-transformers'
    # ``prompts``; ``default_prompt_name`` is used when a request names none.
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    # The special token the tokenizer ends every input with ([SEP], </s>); None if none, or exported before this was
    # recorded. A token-id input cut to the context keeps it.
    end_token_id: int | None = None
    # The special token the tokenizer opens every input with ([CLS], <s>); None as above. A token-id input must start
    # with it: ids from another tokenizer (LangChain's default sends tiktoken's) would otherwise embed as noise.
    start_token_id: int | None = None

    @property
    def name(self) -> str:
        return triton_name(self.served_name)

    def prompt(self, name: str | None) -> str:
        """The text of prompt ``name`` (KeyError if the model has none of that name); None: the default
        prompt's, or nothing, as sentence-transformers resolves it."""
        if name is None:
            return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name is not None else ""
        return self.prompts[name]

    def with_prompt(self, texts: Sequence[str], name: str | None) -> list[str]:
        """The texts as the model is to read them: the prompt put before each, except before a text that
        already starts with it (a client such as Dify may have put it there). The default prompt (``name`` None) also
        gives way to any other of the model's prompts: Dify's query prefix before a query, with a default document
        prompt. A prompt asked for by name does not: a document that begins "トピック: " is still a document, as
        sentence-transformers' ``encode(prompt_name=...)`` reads it."""
        prompt = self.prompt(name)
        given = (prompt,) if name is not None else tuple(p for p in self.prompts.values() if p)
        return [t if not prompt or t.startswith(given) else prompt + t for t in texts]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        if "prefixes" in raw and "prompts" not in raw:  # exported before prompts had their name
            raw["prompts"] = raw["prefixes"]
        known = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["encoder_inputs"] = tuple(raw["encoder_inputs"])
        if raw["task"] not in TASKS:
            raise ValueError(f"unknown task {raw['task']!r}")
        return cls(**raw)


# Prompts of the ruri family by model id: export falls back on them only for a model whose own
# sentence-transformers config defines none (ruri v1 does not).
RURI_V1_PROMPTS = {"query": "クエリ: ", "document": "文章: "}
RURI_V3_PROMPTS = {"query": "検索クエリ: ", "document": "検索文書: ", "topic": "トピック: "}


def known_prompts(source: str) -> dict[str, str]:
    low = source.lower()
    if "ruri" not in low or "reranker" in low:
        return {}
    return dict(RURI_V3_PROMPTS if "ruri-v3" in low else RURI_V1_PROMPTS)

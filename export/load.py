"""Step 1 of export: find the model (a directory, the Hugging Face hub or its cache), load it exactly
as sentence-transformers does, and describe it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fos_runtime import spec


@dataclasses.dataclass
class Source:
    task: str
    model_id: str
    model: Any  # a SentenceTransformer or a CrossEncoder
    tokenizer: Any  # the HF tokenizer that model uses
    max_length: int
    encoder_inputs: tuple[str, ...]
    output_key: str  # the key of the model's features dict the graph returns
    activation: Callable | None  # rerank: the CrossEncoder's activation (sigmoid for one label)
    dimension: int
    model_normalizes: bool
    hf_config: Any
    # sentence-transformers' own answer, for parity: reference(items, prompt), the prompt given
    # explicitly ("" for none) so that the one the spec resolves is the one compared.
    reference: Callable[..., np.ndarray]
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)  # the model's own, as sentence-transformers has them
    pools_prompt: bool = True  # its pooling takes the prompt's tokens in, as the served graph does
    default_prompt_name: str | None = None


def _positions(hf_model) -> int | None:
    """How many tokens the model's position embeddings take. RoBERTa-style models (XLM-R, so multilingual-e5, and
    MPNet) number positions from just past the padding token's id, so they take that many fewer than their config's
    max_position_embeddings; such models give their position embeddings that ``padding_idx``."""
    positions = getattr(hf_model.config, "max_position_embeddings", None)
    base = getattr(hf_model, "base_model", hf_model)  # a cross-encoder's head wraps it
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    padding = getattr(table, "padding_idx", None)
    if positions is not None and padding is not None:
        positions -= padding + 1
    return positions


def _check_max_length(model_id: str, max_length: int | None, hf_model, own: int | None = None) -> None:
    """A context past the model's position embeddings would pass export and fail in the engine at the first long
    input (an index out of range). ``own``: the model's max_seq_length, where --max-length is not given."""
    positions = _positions(hf_model)
    if max_length is not None and (max_length < 2 or (positions is not None and max_length > positions)):
        raise ValueError(f"--max-length {max_length}: {model_id} takes 2 to {positions} tokens an input")
    if max_length is None and own is not None and positions is not None and own > positions:
        raise ValueError(
            f"{model_id} sets max_seq_length {own}, past its {positions} positions: "
            f"export it with --max-length {positions} or less"
        )


def _loaded(make: Callable[[], Any], model_id: str) -> Any:
    """sentence-transformers' model, or a one-line error where it cannot load it (a setting it does not support, a
    module it lacks); the hub's and the filesystem's errors (OSError) stay as they are."""
    try:
        return make()
    except OSError:
        raise
    except Exception as exc:
        raise ValueError(f"sentence-transformers cannot load {model_id}: {type(exc).__name__}: {exc}") from exc


def _transformer(model, model_id: str):
    """The Hugging Face model inside the first module, the one the graph is traced from."""
    first = model[0]
    inner = getattr(first, "model", None)
    if getattr(inner, "config", None) is None:
        raise ValueError(
            f"{model_id} begins with {type(first).__name__}, not a Hugging Face transformer; fos export takes "
            "sentence-transformers models whose first module is a Transformer"
        )
    return inner


def _fix_token_types(tokenizer, hf_config) -> None:
    # transformers 5 dropped token_type_ids from BertJapaneseTokenizer's model_input_names, so a
    # BERT cross-encoder would see its second segment as type 0, unlike in training. Ask for them
    # back wherever the model has segment embeddings; export and reference then agree, and agree
    # with what ruri was trained on.
    if getattr(hf_config, "type_vocab_size", 1) > 1 and spec.TOKEN_TYPE_IDS not in tokenizer.model_input_names:
        tokenizer.model_input_names = [spec.INPUT_IDS, spec.TOKEN_TYPE_IDS, spec.ATTENTION_MASK]


def _encoder_inputs(tokenizer, pair: bool) -> tuple[str, ...]:
    sample = tokenizer(["テスト"], ["テスト"] if pair else None)
    return tuple(name for name in spec.ENCODER_INPUTS_ALL if name in sample)


class ModelUnavailable(RuntimeError):
    """The model can be had neither from a directory, nor the hub, nor the local cache; the message
    says what failed and what to do."""


def locate(model_id: str) -> bool:
    """Check, before anything slow, that the model can be had; True when it must be read from the
    local cache only (the hub is unreachable or HF_HUB_OFFLINE is set, and the cache has it).

    One metadata request with a timeout and no retries answers whether the hub is reachable;
    huggingface_hub's downloads would instead retry each file five times with backoff."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    if Path(model_id).is_dir():
        return False
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelUnavailable(f"{model_id}: no such directory (and not a Hugging Face id such as cl-nagoya/ruri-large)")
    try:
        cached = isinstance(huggingface_hub.try_to_load_from_cache(model_id, "config.json"), str)
    except HFValidationError as exc:
        raise ModelUnavailable(f"{model_id!r} is neither a directory nor a Hugging Face model id: {exc}") from exc
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise ModelUnavailable(_unreachable(model_id, "HF_HUB_OFFLINE is set"))
    try:
        huggingface_hub.model_info(model_id, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelUnavailable(
            f"{model_id} was not found on {constants.ENDPOINT}: check the id; a private or gated model needs "
            f"HF_TOKEN (or `hf auth login`). ({type(exc).__name__})"
        ) from exc
    except Exception as exc:  # no connection, DNS, TLS, proxy, a 5xx from the hub or a mirror
        if cached:
            return True
        raise ModelUnavailable(_unreachable(model_id, f"cannot reach {constants.ENDPOINT} ({exc})")) from exc
    return False


HUB_TIMEOUT_S = 10.0


def _unreachable(model_id: str, why: str) -> str:
    from huggingface_hub import constants

    folder = f"/path/to/{model_id.split('/')[-1]}"
    return (
        f"cannot get {model_id}: {why}, and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}).\n"
        "Do one of:\n"
        f"  - pass a local directory with the model's files, served under this name: fos serve --model "
        f"{model_id}={folder} (fos export --model {folder} --name {model_id})\n"
        f"  - download it where the hub is reachable (`hf download {model_id}`), copy that machine's Hugging Face cache "
        "(HF_HOME, default ~/.cache/huggingface) here and run with HF_HUB_OFFLINE=1\n"
        "  - use a mirror of the hub: HF_ENDPOINT=https://your-mirror"
    )


def load(
    model_id: str, task: str, max_length: int | None = None, trust_remote_code: bool = False, local_files_only: bool = False
) -> Source:
    if task == "embed":
        return _load_embed(model_id, max_length, trust_remote_code, local_files_only)
    if task == "rerank":
        return _load_rerank(model_id, max_length, trust_remote_code, local_files_only)
    raise ValueError(f"unknown task {task!r}; use embed or rerank")


def _open(cls, model_id: str, max_length: int | None, trust_remote_code: bool, local_files_only: bool) -> tuple[Any, Any]:
    """A SentenceTransformer or CrossEncoder (``cls``) loaded as export serves it, at ``max_length`` if given, checked
    against its position embeddings and asked for token types; and the Hugging Face config of the model inside."""
    options = {"device": "cpu", "trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    model = _loaded(lambda: cls(model_id, **options), model_id)
    model.eval()
    if max_length is not None:
        model.max_seq_length = max_length
    hf_model = _transformer(model, model_id)
    _check_max_length(model_id, max_length, hf_model, model.max_seq_length)
    _fix_token_types(model.tokenizer, hf_model.config)
    return model, hf_model.config


def _load_embed(model_id: str, max_length: int | None, trust_remote_code: bool, local_files_only: bool) -> Source:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize

    model, hf_config = _open(SentenceTransformer, model_id, max_length, trust_remote_code, local_files_only)
    tokenizer = model.tokenizer
    # sentence-transformers 6 renamed the method; keep working with the older name too.
    get_dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dimension = get_dimension() or 0

    def reference(texts: Sequence[str], prompt: str = "") -> np.ndarray:
        import torch  # here: serving imports this module for its errors, without torch

        with torch.inference_mode():
            return model.encode(
                list(texts),
                prompt=prompt,
                batch_size=1,  # each text alone, unpadded: the plainest reference
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )

    return Source(
        task="embed",
        model_id=model_id,
        model=model,
        tokenizer=tokenizer,
        max_length=int(model.max_seq_length or 0),
        encoder_inputs=_encoder_inputs(tokenizer, pair=False),
        output_key="sentence_embedding",
        activation=None,
        dimension=int(dimension),
        model_normalizes=any(isinstance(m, Normalize) for m in model),
        pools_prompt=_pools_prompt(model),
        hf_config=hf_config,
        reference=reference,
        prompts={name: text or "" for name, text in model.prompts.items()},
        default_prompt_name=model.default_prompt_name,
    )


def _pools_prompt(model) -> bool:
    from sentence_transformers.sentence_transformer.modules import Pooling

    return all(m.include_prompt for m in model if isinstance(m, Pooling))


def _load_rerank(model_id: str, max_length: int | None, trust_remote_code: bool, local_files_only: bool) -> Source:
    from sentence_transformers import CrossEncoder

    model, hf_config = _open(CrossEncoder, model_id, max_length, trust_remote_code, local_files_only)
    if model.num_labels != 1:
        raise ValueError(f"{model_id} has {model.num_labels} labels; only one-logit rerankers can be served")
    tokenizer = model.tokenizer

    def reference(pairs: Sequence[tuple[str, str]], prompt: str = "") -> np.ndarray:
        import torch  # here: serving imports this module for its errors, without torch

        with torch.inference_mode():
            scores = model.predict([tuple(p) for p in pairs], prompt=prompt, batch_size=1, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32)

    return Source(
        task="rerank",
        model_id=model_id,
        model=model,
        tokenizer=tokenizer,
        max_length=int(model.max_seq_length or 0),
        encoder_inputs=_encoder_inputs(tokenizer, pair=True),
        output_key="scores",
        activation=model.activation_fn,
        dimension=0,
        model_normalizes=False,
        hf_config=hf_config,
        reference=reference,
        prompts={name: text or "" for name, text in model.prompts.items()},
        default_prompt_name=model.default_prompt_name,
    )


def _architectures(model_id: str, local_files_only: bool) -> list[str]:
    import json

    local = Path(model_id)
    if local.is_dir():
        config_file = local / "config.json"
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            config_file = Path(hf_hub_download(model_id, "config.json", local_files_only=local_files_only))
        except EntryNotFoundError:  # not a transformer (a StaticEmbedding model): loading says what it is
            return []
    if not config_file.is_file():
        return []
    return json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []


def _classifies(architectures: list[str]) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def detect_task(model_id: str, local_files_only: bool = False) -> spec.Task:
    """``rerank`` for sequence-classification models (cross-encoders), else ``embed``."""
    return "rerank" if _classifies(_architectures(model_id, local_files_only)) else "embed"


def check_task(model_id: str, task: str, local_files_only: bool = False) -> None:
    """Refuse a task unlike the model's: sentence-transformers loads an embedder as a cross-encoder with a new, random
    head (and a cross-encoder as an embedder without its head), and parity passes, since it compares against the same
    wrong model. A config that names no architecture is taken at its word."""
    architectures = _architectures(model_id, local_files_only)
    if not architectures or _classifies(architectures) == (task == "rerank"):
        return
    other = "embed" if task == "rerank" else "rerank"
    kind = "a cross-encoder (sequence classification)" if other == "rerank" else "not a cross-encoder"
    raise ValueError(f"{model_id} is {kind} ({', '.join(architectures)}): export it with --task {other}")

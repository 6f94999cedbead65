"""Step 5 of export: prove the exported model answers as sentence-transformers does, on every engine that may serve it.

The exported files are read back from the repository and run through the same tokenization and
encoder code that serves requests, on built-in Japanese text, padded in one batch and one by
one; tokens and outputs are compared with the sentence-transformers model export started from.
An embedding model is checked with each of its prompts too, put before the text as serving puts it.

Each engine variant this machine can run is checked (``fos_runtime.engines``): onnxruntime on the file as exported,
on an fp32 CPU export OpenVINO in f32 and in bf16 (where the CPU has bf16 units), and on an int8 one OpenVINO's own
int8 where export made it.
Export records the variants that pass; serving picks only among those.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from fos_runtime import engines, padding, spec, tokenization
from fos_runtime.encoder import Encoder

from .load import Source

SENTENCES = [
    "東京は日本の首都です。",
    "今日はとても良い天気なので、公園を散歩しました。",
    "ラーメンと餃子を食べに行きませんか？",
    "機械学習モデルの推論サーバーをGPUで動かす方法を説明します。",
    "ＡＢＣ１２３ の全角英数字と abc123 の半角英数字が混ざった文。",
    "猫",
    "  前後に空白がある文章  ",
    "富士山は静岡県と山梨県にまたがる活火山で、標高は3776メートルあり、日本で最も高い山として知られています。"
    "古くから信仰の対象とされ、多くの芸術作品にも描かれてきました。2013年には世界文化遺産に登録されました。" * 3,
]
# Longer than ruri v3's local attention window (128 tokens) and ruri v1's whole context (512), so
# the parity check goes through sliding-window attention and truncation.
SENTENCES.append("".join(SENTENCES[:6]) * 12)
QUERIES = ["日本で一番高い山は？", "おいしい料理", "首都はどこですか"]

# Tolerances by compute precision (or, where it differs, by variant) and task; None: reported, not enforced.
TOLERANCE: dict[tuple[str, str], tuple[str, float | None]] = {
    ("bf16", "embed"): ("min_cosine", 0.999),
    ("bf16", "rerank"): ("max_abs_diff", 2e-2),
    ("fp32", "embed"): ("max_abs_diff", 1e-4),
    ("fp32", "rerank"): ("max_abs_diff", 1e-5),
    ("fp16", "embed"): ("min_cosine", 0.999),
    ("fp16", "rerank"): ("max_abs_diff", 5e-3),
    # onnxruntime's int8 moves its outputs by about 1e-3 (ruri-large's shape, random weights: min cosine 0.9985, rerank
    # 2e-5): a coarse floor, which no int8 passes that pools or scores wrong (a wrong pooling: cosine 0.37, review).
    ("int8", "embed"): ("min_cosine", 0.95),
    ("int8", "rerank"): ("max_abs_diff", 0.1),
    # OpenVINO's int8 is held closer than onnxruntime's: its activation ranges come from calibration text, which may be
    # unlike the model's (ruri-large's shape, random weights: min cosine 0.9990). These sentences are among that text,
    # so this check cannot see clipping of text unlike them.
    ("openvino-int8", "embed"): ("min_cosine", 0.99),
    ("openvino-int8", "rerank"): ("max_abs_diff", 5e-2),
}


@dataclasses.dataclass
class Report:
    precision: str
    task: str
    inputs: int
    tokens_equal: bool
    max_abs_diff: float
    min_cosine: float
    metric: str
    limit: float | None
    prompts: tuple[str, ...] = ()  # the prompt names checked besides the plain text
    engine: str = "onnxruntime"  # the variant checked (fos_runtime.engines.VARIANTS)
    not_run: str | None = None  # why this variant could not run on this machine

    @property
    def ok(self) -> bool:
        if self.not_run is not None or not self.tokens_equal:
            return False
        if not (math.isfinite(self.max_abs_diff) and math.isfinite(self.min_cosine)):
            return False  # NaN or infinity out of the engine, or outputs of the wrong shape: even where only reported
        if self.limit is None:
            return True
        value = getattr(self, self.metric)
        return value <= self.limit if self.metric == "max_abs_diff" else value >= self.limit

    @property
    def figures(self) -> dict:
        """What the parity record keeps of a passing variant."""
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine, "compute": self.precision}

    def lines(self) -> list[str]:
        if self.engine == engines.ONNXRUNTIME:
            name = f"onnxruntime, {self.precision}"
        elif self.precision == "int8":
            name = "openvino int8 (NNCF's static quantization of the fp32 graph)"
        else:
            name = f"{self.engine.replace('-', ' ')} on the fp32 export"
        if self.not_run is not None:
            return [f"parity ({name}): not run on this machine: {self.not_run}"]
        enforced = (
            "reported only" if self.limit is None else ("≤ " if self.metric == "max_abs_diff" else "≥ ") + f"{self.limit:g}"
        )
        return [
            f"parity ({name}, {self.task}, {self.inputs} inputs vs sentence-transformers"
            + (f"; prompts {', '.join(self.prompts)}" if self.prompts else "")
            + "):",
            f"  tokens identical: {'yes' if self.tokens_equal else 'NO'}",
            f"  max |diff|:       {self.max_abs_diff:.3e}",
            f"  min cosine:       {self.min_cosine:.6f}",
            f"  check: {self.metric} {enforced} -> {'PASS' if self.ok else 'FAIL'}",
        ]


def compare(reference: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """Max absolute difference and the smallest row cosine between two (n, d) or (n,) arrays."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(ours, dtype=np.float64).reshape(len(ours), -1)
    if a.shape != b.shape:
        return float("inf"), -1.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if a.shape[1] == 1:  # scores: cosine of the score vectors
        a, b = a.T, b.T
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)
    return diff, float(np.min(cos)) if cos.size else 1.0


def _reference_ids(source: Source, texts, pairs) -> list[list[int]]:
    inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
    features = source.model.preprocess(inputs)
    ids, mask = features[spec.INPUT_IDS].tolist(), features[spec.ATTENTION_MASK].tolist()
    return [[t for t, m in zip(row, mrow, strict=True) if m] for row, mrow in zip(ids, mask, strict=True)]


def variants(s: spec.ModelSpec, openvino_int8: bool = False) -> list[engines.Choice]:
    """The engine variants that may serve this export: onnxruntime always; OpenVINO on an fp32 export for the CPU, and
    on an int8 one where export made OpenVINO's int8 (``openvino_int8``)."""
    found = [engines.Choice(engines.ONNXRUNTIME, s.precision)]
    if s.precision == "fp32" and s.device == "cpu":
        found += [engines.Choice(engines.OPENVINO, "fp32"), engines.Choice(engines.OPENVINO, "bf16")]
    if s.precision == "int8" and s.device == "cpu" and openvino_int8:
        found.append(engines.Choice(engines.OPENVINO, "int8"))
    return found


def check(source: Source, s: spec.ModelSpec, repository: Path) -> list[Report]:
    """One report per variant, onnxruntime's first."""
    tokenizer = tokenization.Tokenizer(spec.tokenizer_files(repository, s.name), s.max_length)
    model = spec.encoder_file(repository, s.name)
    names: list[str | None] = [None]
    if s.task == "embed":
        names += [name for name, text in s.prompts.items() if text]
        texts = [t for name in names for t in s.with_prompt(SENTENCES, name)]
        pairs = None
        reference = np.concatenate([source.reference(SENTENCES, s.prompt(name)) for name in names])
    else:
        queries = [q for q in QUERIES for _ in SENTENCES]
        pairs = [d for _ in QUERIES for d in SENTENCES]
        texts = s.with_prompt(queries, None)  # a cross-encoder's default prompt goes before the query
        reference = source.reference(list(zip(queries, pairs, strict=True)), s.prompt(None))

    encoded = tokenizer.encode(texts, pairs)
    tokens_equal = encoded.input_ids == _reference_ids(source, texts, pairs)
    checked = tuple(name for name in names if name is not None)
    reports = []
    for choice in variants(s, spec.openvino_int8_file(model).exists()):
        metric, limit = TOLERANCE.get((choice.variant, s.task)) or TOLERANCE[(choice.compute, s.task)]
        try:
            encoder = Encoder(model, device="cpu", engine=choice, precision=s.precision)
            diff, cos = _run(encoder, encoded, s, reference)
        except Exception as exc:  # OpenVINO bf16 on a CPU without bf16 units; onnxruntime's own failures are export's
            if choice.engine == engines.ONNXRUNTIME:
                raise
            reports.append(
                Report(choice.compute, s.task, 0, tokens_equal, 0.0, 0.0, metric, limit, checked, choice.variant, str(exc))
            )
            continue
        reports.append(
            Report(choice.compute, s.task, len(texts), tokens_equal, diff, cos, metric, limit, checked, engine=choice.variant)
        )
    return reports


def _run(encoder: Encoder, encoded: tokenization.Encoded, s: spec.ModelSpec, reference: np.ndarray) -> tuple[float, float]:
    """Max |diff| and min cosine against the reference, over every input alone and the plain texts in one batch."""
    texts = encoded.input_ids
    # Every input alone, and the first len(SENTENCES) (the plain texts; the first query's pairs) in one
    # batch padded to the longest: padding must change nothing. One such batch is enough; more would
    # cost rows x longest² in attention for nothing new.
    first = list(range(len(SENTENCES)))
    batched = encoder.run(padding.pad(encoded, s.pad_token_id, s.encoder_inputs, order=first))
    single = np.concatenate(
        [encoder.run(padding.pad(encoded, s.pad_token_id, s.encoder_inputs, order=[i])) for i in range(len(texts))]
    )
    if s.task == "rerank":
        batched, single = batched.reshape(-1), single.reshape(-1)
    d1, c1 = compare(reference[first], batched)
    d2, c2 = compare(reference, single)
    return max(d1, d2), min(c1, c2)

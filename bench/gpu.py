"""The encoder alone on a GPU, against sentence-transformers fp16 on the same GPU: the ceiling that the served
path (``bench/gpu_run.sh``) is measured against.

The project's encoder is the fp16 ``model.onnx`` that ``fos export --device gpu --precision fp16`` wrote, run by
onnxruntime's CUDA provider through ``fos_runtime.batching`` with the GPU plan (what Triton's Python-backend
encoder runs). The inputs are JGLUE text, three sentences to one paragraph (``fos bench``'s batch-embed mix),
tokenized beforehand with the model's own tokenizer, so tokenization is outside both timings. The baseline is
sentence-transformers' ``encode`` in fp16 (inputs sorted by length, batches of 32, each padded to its longest).

    python3 -m bench.gpu --repository REPO --name cl-nagoya/ruri-large --st DIR --out OUT
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

N_INPUTS = 4096


def texts(corpus: Path | None, n: int = N_INPUTS) -> list[str]:
    from .corpus import load

    c = load(corpus)
    rng = random.Random(0)
    return [rng.choice(c.long) if rng.random() < 0.25 else rng.choice(c.short) for _ in range(n)]


def _timed(fn: Callable[[], Any], repeats: int = 5) -> tuple[float, Any]:
    fn()  # warm-up: allocations, kernels for each shape
    runs, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), result


def _st_encode(st, ids: list[list[int]], batch_size: int) -> np.ndarray:
    """sentence-transformers' encode after tokenization: longest first, fixed-size batches."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = np.empty((len(ids), st.get_embedding_dimension()), np.float32)
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            rows = order[k : k + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            features = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}
            out[rows] = st({k: v.to(st.device) for k, v in features.items()})["sentence_embedding"].float().cpu().numpy()
    return out


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def run(repository: Path, name: str, out: Path, st_dir: Path | None, corpus: Path | None, device: str = "gpu") -> dict:
    import onnxruntime as ort

    from fos_runtime import batching, spec
    from fos_runtime.encoder import Encoder
    from fos_runtime.tokenization import Encoded, Tokenizer
    from shim.repository import read_specs

    s = next(x for x in read_specs(repository) if x.served_name == name)
    tokenizer = Tokenizer(spec.tokenizer_files(repository, s.name), s.max_length)
    ids = tokenizer.encode(texts(corpus)).input_ids
    tokens = sum(map(len, ids))
    report: dict[str, Any] = {"inputs": len(ids), "tokens": tokens, "onnxruntime": ort.__version__}
    encoder = Encoder(spec.encoder_file(repository, s.name), device=device)
    report["session_providers"] = encoder.session.get_providers()
    encoded = Encoded(input_ids=ids, token_type_ids=[[0] * len(x) for x in ids])
    plan = batching.plan_for(encoder.device)
    stats = batching.Stats()
    secs, (vectors,) = _timed(
        lambda: batching.run(encoder, [encoded], s.pad_token_id, s.encoder_inputs, plan, stats, s.max_length)
    )
    report["encoder_alone"] = {"s": secs, "tokens_per_s": tokens / secs, "padding_efficiency": stats.padding_efficiency}
    print(
        f"encoder alone (fp16, {plan.max_rows} rows / {plan.max_tokens} tokens a run): {tokens / secs:,.0f} tokens/s", flush=True
    )
    if st_dir is not None:
        import torch
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(st_dir), device="cuda" if device == "gpu" else "cpu")
        reference = _st_encode(st, ids[:512], 32)  # fp32, for parity
        if device == "gpu":
            st.half()
        secs, st_vectors = _timed(lambda: _st_encode(st, ids, 32))
        report["st_fp16_bs32"] = {"s": secs, "tokens_per_s": tokens / secs}
        report["min_cosine_vs_st_fp32"] = {"fos_fp16": _min_cosine(vectors[:512], reference),
                                           "st_fp16": _min_cosine(st_vectors[:512], reference)}  # fmt: skip
        print(f"sentence-transformers ({st.dtype}), batch 32: {tokens / secs:,.0f} tokens/s", flush=True)
        del st
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--name", default="cl-nagoya/ruri-large")
    p.add_argument("--st", type=Path, help="the sentence-transformers directory the export came from (baseline)")
    p.add_argument("--corpus", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="cpu: to try the script out")
    args = p.parse_args()
    run(args.repository, args.name, args.out, args.st, args.corpus, args.device)


if __name__ == "__main__":
    main()

"""GPU check: the project's GPU path against sentence-transformers fp16, on ruri-large's exact shape.

The project's path is export's own conversion (``export.convert``: ONNX with pooling inside, BERT
fusions, fp16 with float32 inputs and outputs) run by onnxruntime's CUDA provider through the shared
padding-aware batching (``fos_runtime.batching``): what the embedded backend runs on a GPU, and what
Triton's Python-backend encoder runs. The baseline is sentence-transformers' ``encode`` in fp16 on the
same GPU: inputs sorted by length, batches of 32, each padded to its longest.

Tokenization is left out of both sides. The GPU machine has no MeCab, so the inputs (JGLUE text,
three sentences to one paragraph, like ``fos bench``'s batch-embed) are tokenized beforehand, here,
with the benchmark model's own tokenizer, and both sides get the same ids.

    uv run python -m bench.gpu prepare --tokenizer /tmp/bench/ruri-large/hf --out .gpu   # here
    python3 -m bench.gpu run --data .gpu --out "$OUT"                                    # on the GPU machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

N_INPUTS = 4096
MAX_LENGTH = 512


def prepare(tokenizer_dir: Path, out: Path, corpus: Path | None) -> None:
    from transformers import AutoTokenizer

    from .corpus import load

    texts = load(corpus)
    rng = random.Random(0)
    picked = [rng.choice(texts.long) if rng.random() < 0.25 else rng.choice(texts.short) for _ in range(N_INPUTS)]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(picked, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "ids.npz",
        ids=np.concatenate([np.asarray(x, np.int32) for x in ids]),
        lengths=np.asarray([len(x) for x in ids], np.int32),
    )
    (out / "vocab.txt").write_bytes((tokenizer_dir / "vocab.txt").read_bytes())
    print(f"{len(ids)} inputs, {sum(map(len, ids))} tokens ({texts.source}) -> {out}")


def _load_ids(data: Path) -> list[list[int]]:
    z = np.load(data / "ids.npz")
    bounds = np.cumsum(np.concatenate([[0], z["lengths"]]))
    return [z["ids"][a:b].astype(np.int64).tolist() for a, b in itertools.pairwise(bounds)]


def _build(data: Path, work: Path, layers: int, hidden: int):
    """ruri-large's shape (BertModel, 24 x 1024, vocab 32768, mean pooling), random weights, seed 0;
    fewer layers and a smaller width only to try the script out on a CPU."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel, BertTokenizer

    hf = work / "hf"
    config = BertConfig(
        vocab_size=32768,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=MAX_LENGTH,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(hf))
    BertTokenizer(str(data / "vocab.txt"), model_max_length=MAX_LENGTH).save_pretrained(str(hf))
    return SentenceTransformer(
        modules=[Transformer(str(hf), max_seq_length=MAX_LENGTH), Pooling(hidden, pooling_mode="mean")], device="cpu"
    ).eval()


def _export_fp16(st, work: Path) -> tuple[Path, dict]:
    from export import convert
    from export.load import Source, _encoder_inputs, _fix_token_types

    tokenizer = st.tokenizer
    hf_config = getattr(st[0], "auto_model", None) or st[0].model
    hf_config = hf_config.config
    _fix_token_types(tokenizer, hf_config)
    source = Source(
        task="embed",
        model_id="ruri-large-shape",
        model=st,
        tokenizer=tokenizer,
        max_length=MAX_LENGTH,
        encoder_inputs=_encoder_inputs(tokenizer, pair=False),
        output_key="sentence_embedding",
        activation=None,
        dimension=hf_config.hidden_size,
        model_normalizes=False,
        hf_config=hf_config,
        reference=lambda *_: np.zeros(0),
    )
    times = {}
    t = time.perf_counter()
    convert.to_onnx(source, work / "model.onnx")
    times["to_onnx_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fused = convert.optimize(source, work / "model.onnx", work / "fused.onnx")
    times["fuse_s"] = time.perf_counter() - t
    t = time.perf_counter()
    convert.to_precision(work / ("fused.onnx" if fused is not None else "model.onnx"), work / "fp16.onnx", "fp16")
    times["fp16_s"] = time.perf_counter() - t
    return work / "fp16.onnx", {**times, "fused": fused, "encoder_inputs": list(source.encoder_inputs)}


def _st_encode(st, ids: list[list[int]], batch_size: int) -> np.ndarray:
    """sentence-transformers' encode after tokenization: longest first, fixed-size batches."""
    import torch

    device = st.device
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    dimension = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    out = np.empty((len(ids), dimension()), np.float32)
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            rows = order[k : k + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            features = {
                "input_ids": input_ids.to(device),
                "attention_mask": mask.to(device),
                "token_type_ids": torch.zeros_like(input_ids).to(device),
            }
            out[rows] = st(features)["sentence_embedding"].float().cpu().numpy()
    return out


def _timed(fn, repeats: int = 5) -> tuple[float, Any]:
    fn()  # warm-up: allocations, kernels for each shape
    runs, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), result


def run(data: Path, out: Path, work: Path, layers: int = 24, hidden: int = 1024, limit: int | None = None) -> None:
    import onnxruntime as ort
    import torch

    from fos_runtime import batching
    from fos_runtime.encoder import Encoder
    from fos_runtime.tokenization import Encoded

    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if gpu else "none (CPU try-out)",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }
    ids = _load_ids(data)[:limit]
    tokens = sum(map(len, ids))
    report.update(inputs=len(ids), tokens=tokens)
    t = time.perf_counter()
    st = _build(data, work, layers, hidden)
    report["build_s"] = time.perf_counter() - t
    path, export_info = _export_fp16(st, work)
    report["export"] = export_info
    print(json.dumps(report, indent=1), flush=True)

    # Reference: sentence-transformers fp32 on the GPU, for the parity of both fp16 paths.
    st.to("cuda" if gpu else "cpu")
    reference = _st_encode(st, ids[:512], 32)
    if gpu:
        st.half()
    for bs in (32, 128):
        secs, vectors = _timed(lambda bs=bs, st=st: _st_encode(st, ids, bs))
        report[f"st_fp16_bs{bs}"] = {"s": secs, "tokens_per_s": tokens / secs}
        if bs == 32:
            report["st_fp16_min_cosine"] = _min_cosine(vectors[:512], reference)
        print(f"sentence-transformers fp16 batch {bs}: {tokens / secs:,.0f} tokens/s", flush=True)
    st.cpu()
    del st
    torch.cuda.empty_cache()

    if gpu and hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels torch uses
        try:
            ort.preload_dlls()
        except Exception as exc:
            print(f"onnxruntime.preload_dlls: {exc}", flush=True)
    encoder = Encoder(path, device="gpu" if gpu else "cpu")
    report["session_providers"] = encoder.session.get_providers()
    encoded = Encoded(input_ids=ids)
    inputs = tuple(export_info["encoder_inputs"])
    for name, limits in (("default", batching.PLANS["cpu"]), ("gpu", batching.PLANS["gpu"])):
        stats = batching.Stats()
        secs, (vectors,) = _timed(lambda limits=limits, stats=stats: batching.run(encoder, [encoded], 0, inputs, limits, stats))
        report[f"fos_fp16_{name}"] = {
            "s": secs,
            "tokens_per_s": tokens / secs,
            "max_batch": limits.max_rows,
            "max_batch_tokens": limits.max_tokens,
            "padding_efficiency": stats.padding_efficiency,
        }
        if name == "default":
            report["fos_fp16_min_cosine"] = _min_cosine(vectors[:512], reference)
        print(
            f"fos fp16 ({name} batches): {tokens / secs:,.0f} tokens/s, padding efficiency {stats.padding_efficiency:.2f}",
            flush=True,
        )
    best_st = max(report["st_fp16_bs32"]["tokens_per_s"], report["st_fp16_bs128"]["tokens_per_s"])
    report["ratio_default_vs_st_bs32"] = report["fos_fp16_default"]["tokens_per_s"] / report["st_fp16_bs32"]["tokens_per_s"]
    report["ratio_best_vs_best_st"] = (
        max(report["fos_fp16_default"]["tokens_per_s"], report["fos_fp16_gpu"]["tokens_per_s"]) / best_st
    )
    (out / "gpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), flush=True)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="tokenize the inputs here (needs MeCab)")
    pre.add_argument("--tokenizer", type=Path, required=True, help="the benchmark model's tokenizer directory")
    pre.add_argument("--corpus", type=Path)
    pre.add_argument("--out", type=Path, default=Path(".gpu"))
    r = sub.add_parser("run", help="build, export fp16 and measure, on the GPU machine")
    r.add_argument("--data", type=Path, default=Path(".gpu"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("/tmp/fos-gpu"))
    r.add_argument("--layers", type=int, default=24)
    r.add_argument("--hidden", type=int, default=1024)
    r.add_argument("--limit", type=int, help="use only the first N inputs")
    args = p.parse_args()
    if args.command == "prepare":
        prepare(args.tokenizer, args.out, args.corpus)
    else:
        run(args.data, args.out, args.work, args.layers, args.hidden, args.limit)


if __name__ == "__main__":
    main()

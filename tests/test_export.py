"""``fos export``: parity with sentence-transformers, the written repository, and failure paths."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import export.load
from export import parity
from export.main import ExportOptions, ParityError
from export.main import export as run_export
from export.parity import TOLERANCE, Report, compare
from fos_runtime import batching, spec
from fos_runtime.tokenization import Tokenizer
from shim.cli import main
from shim.repository import parse, read_specs

import tiny_models
from helpers import EMBED, EMBED_V3, RERANK, RERANK_V3, SERVED, gone_pid


@pytest.mark.parametrize("key", sorted(SERVED.values()))
def test_cli_export_prints_passing_parity(exported, key):
    printed = exported["printed"][key]
    assert "tokens identical: yes" in printed
    assert "-> PASS" in printed and "FAIL" not in printed
    assert "export finished" in printed
    if key == "embed_v3":  # each of the model's prompts is checked too
        assert "prompts query, document, topic" in printed


def test_specs_in_the_repository(exported):
    specs = {s.served_name: s for s in read_specs(exported["repository"])}
    assert set(specs) == set(SERVED)
    e, r = specs[EMBED], specs[RERANK]
    assert (e.task, e.dimension, e.max_length, e.normalize, e.model_normalizes) == ("embed", 32, 32, True, False)
    assert r.task == "rerank" and r.max_length == 32
    # Token types reach the cross-encoder (transformers 5 would drop them for BertJapaneseTokenizer).
    assert spec.TOKEN_TYPE_IDS in r.encoder_inputs
    assert e.name == "test--ruri-tiny"
    # A model without prompts of its own, from a directory without "ruri" in its path, served under a name with it:
    # ruri v1's prompts, by that name (as for ruri-large from a directory, served as cl-nagoya/ruri-large).
    assert e.prompts == {"query": "クエリ: ", "document": "文章: "} and e.default_prompt_name is None
    assert "ruri" not in e.source
    # ruri v3: 8192 tokens, no token types, its prompts read from the model (the path has no "ruri").
    e3, r3 = specs[EMBED_V3], specs[RERANK_V3]
    assert (e3.max_length, r3.max_length) == (8192, 8192)
    assert e3.encoder_inputs == r3.encoder_inputs == (spec.INPUT_IDS, spec.ATTENTION_MASK)
    assert e3.prompts == {"query": "検索クエリ: ", "document": "検索文書: ", "topic": "トピック: "}
    assert e3.default_prompt_name is None
    assert "ruri" not in e3.source
    # Exported with the Python encoder: the shim may send Triton whole rounds (shim.backends.triton._calls).
    assert all(s.ragged for s in specs.values())


def test_configs_chain_tokenizer_to_encoder(exported):
    repo = exported["repository"]
    for s in read_specs(repo):
        ens = parse((repo / s.name / "config.pbtxt").read_text())
        tok = parse((repo / spec.tokenizer_model(s.name) / "config.pbtxt").read_text())
        enc = parse((repo / spec.encoder_model(s.name) / "config.pbtxt").read_text())
        steps = ens.ensemble_scheduling.step
        assert [st.model_name for st in steps] == [tok.name, enc.name]
        assert set(steps[0].input_map) == {i.name for i in tok.input} == {i.name for i in ens.input}
        assert {i.name for i in enc.input} == set(s.encoder_inputs) == set(steps[1].input_map)
        assert set(steps[0].output_map) == {o.name for o in tok.output}
        assert set(steps[1].input_map.values()) <= set(steps[0].output_map.values())
        assert {o.name for o in ens.output} == {*steps[1].output_map.values(), spec.NUM_TOKENS, spec.TRUNCATED}
        assert enc.backend == "python" and (repo / enc.name / "1" / "model.py").exists()
        assert (repo / enc.name / "1" / "model.onnx").exists()
        # Each Python model carries the shared runtime and nothing of the shim.
        for model in (tok.name, enc.name):
            assert (repo / model / "1" / "fos_runtime" / "tokenization.py").exists()
            assert not (repo / model / "1" / "shim").exists()
        assert {tok.max_batch_size, enc.max_batch_size, ens.max_batch_size} == {batching.plan_for(s.device).max_rows}


@pytest.mark.parametrize(
    ("device", "max_length", "backend", "merges"),
    [
        ("gpu", 512, "onnxruntime", True),  # ruri-large: a merged run is at most 256 x 512, twice a call's bound
        ("gpu", 8192, "onnxruntime", False),  # ruri v3: it could be 256 x 8,192 tokens
        ("gpu", 8192, "python", True),  # cuts its own runs
        ("cpu", 8192, "onnxruntime", False),
        ("cpu", 512, "onnxruntime", True),
    ],
)
def test_only_encoders_whose_merged_runs_stay_bounded_merge_calls(device, max_length, backend, merges):
    # Triton's dynamic batcher merges equal-shape calls up to max_batch_size rows and bounds no tokens: a review of
    # Triton 25.02's batcher found a ruri v3 call of 8 x 8,192 tokens could be merged into one run of 256 x 8,192.
    from export.repository import encoder_config

    s = spec.ModelSpec(
        served_name="m", task="embed", source="m", max_length=max_length, encoder_inputs=(spec.INPUT_IDS,),
        pad_token_id=0, vocab_size=10, dimension=2, device=device,
    )  # fmt: skip
    assert encoder_config(s, backend).HasField("dynamic_batching") == merges


def test_attention_is_fused(exported):
    # onnxruntime's fused Attention is the fast path on CPU and GPU; transformers' default SDPA
    # attention traces into a pattern the fusion misses, so export traces the eager one. ModernBERT, which
    # onnxruntime's fusions do not know, is traced with its attention operators (export.modernbert).
    import onnx

    repo = exported["repository"]
    for s in read_specs(repo):
        key = SERVED[s.served_name]
        model = onnx.load(str(repo / spec.encoder_model(s.name) / "1" / "model.onnx"))
        ops = [n.op_type for n in model.graph.node]
        assert "Softmax" not in ops, (s.served_name, sorted(set(ops)))
        if s.served_name in (EMBED, RERANK):
            assert ops.count("Attention") == 2, (s.served_name, sorted(set(ops)))
            assert "fused: " in exported["printed"][key] and "Attention x2" in exported["printed"][key]
            assert "not fused" not in exported["printed"][key]
        else:
            layers = tiny_models.LAYERS_V3
            assert ops.count("MultiHeadAttention") == layers and ops.count("RotaryEmbedding") == 2 * layers
            # Fixed-size splits, not the shape arithmetic that chunk() traces into.
            assert "Slice" not in ops and "IsNaN" not in ops, sorted(set(ops))
            # The rotary positions are built once for every layer (each layer's own was some twenty small operators).
            assert ops.count("Range") == 1, ops.count("Range")
            assert f"fused: MultiHeadAttention x{layers}, RotaryEmbedding x{2 * layers}" in exported["printed"][key]
            _assert_masks_without_a_batch_sized_bias(model)


def _assert_masks_without_a_batch_sized_bias(model) -> None:
    """No bias of a batch's shape reaches MultiHeadAttention: onnxruntime 1.20.1 (the NGC 25.02 container's) computes a
    bias of (batch, 1, ...) wrong for every row after the first, and 1.19 rejects it (docs/benchmarks.md). The global
    layers take q, k and v alone (their padding rides in one more component a head; onnxruntime's flash attention on the
    CPU), the local layers a key padding mask of (batch, sequence) and their window as a bias of (1, 1, ...)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.value_info}
    nodes = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    local = [n for n in nodes if len(n.input) == 6 and n.input[3] == ""]
    assert 0 < len(local) < len(nodes) and all(len(n.input) == 3 for n in nodes if n not in local), [n.input for n in nodes]
    assert all(shapes[n.input[4]] == ["batch", "sequence"] and shapes[n.input[5]][:2] == [1, 1] for n in local), [
        (shapes.get(n.input[4]), shapes.get(n.input[5])) for n in local
    ]


def test_cpu_sessions_keep_layer_norm_apart_from_the_residual_add(exported, tmp_path, monkeypatch):
    # onnxruntime's CPU SkipLayerNormalization ran 5x slower than Add + LayerNormalization: export leaves them apart,
    # and the encoder's CPU session does not fuse them again, as onnxruntime otherwise does when it loads the graph.
    import onnx
    import onnxruntime as ort

    from fos_runtime import engines
    from fos_runtime.encoder import Encoder

    def ops(path: Path) -> list[str]:
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    real = ort.InferenceSession

    def writing_what_runs(path, sess_options, **kwargs):
        sess_options.optimized_model_filepath = str(tmp_path / "encoder.onnx")
        return real(path, sess_options=sess_options, **kwargs)

    repo = exported["repository"]
    for served in (EMBED, RERANK):
        s = next(s for s in read_specs(repo) if s.served_name == served)
        path = spec.encoder_file(repo, s.name)
        assert "SkipLayerNormalization" not in ops(path) and "LayerNormalization" in ops(path), served
        assert "SkipLayerNormalization" not in exported["printed"][SERVED[served]]
        default = ort.SessionOptions()
        default.optimized_model_filepath = str(tmp_path / "default.onnx")
        ort.InferenceSession(str(path), default, providers=["CPUExecutionProvider"])
        assert "SkipLayerNormalization" in ops(tmp_path / "default.onnx")  # what the encoder keeps from happening
        with monkeypatch.context() as m:
            m.setattr(ort, "InferenceSession", writing_what_runs)
            Encoder(path, device="cpu", engine=engines.Choice(engines.ONNXRUNTIME, "fp32"))
        runs = ops(tmp_path / "encoder.onnx")
        assert "SkipLayerNormalization" not in runs and "LayerNormalization" in runs and "Attention" in runs, served


def test_export_warns_when_attention_is_not_fused(tiny_dirs, tmp_path):
    # onnxruntime 1.30's fusion misses transformers 5's attention mask: the graph is right but slower, and only this
    # line says so. The fusion is switched off here to stand for such a version.
    from onnxruntime.transformers import optimizer

    from export import convert

    source = export.load.load(str(tiny_dirs["embed"]), "embed", local_files_only=True)
    convert.to_onnx(source, tmp_path / "raw.onnx")
    # The optimizer's own reference: it imports its modules by their top-level names.
    with mock.patch.object(optimizer.BertOnnxModel, "fuse_attention", lambda self: None):
        fused = convert.optimize(source, tmp_path / "raw.onnx", tmp_path / "unfused.onnx")
    assert fused is not None and "Attention" not in fused
    warning = convert.unfused_attention(fused)
    assert warning and "attention was not fused" in warning and "1.31" in warning
    assert convert.unfused_attention(convert.optimize(source, tmp_path / "raw.onnx", tmp_path / "fused.onnx")) is None
    assert convert.unfused_attention(None) is None  # an architecture onnxruntime does not fuse: nothing to say


def test_exported_tokenizer_gives_segment_ids(exported):
    r = next(s for s in read_specs(exported["repository"]) if s.task == "rerank")
    tok = Tokenizer(exported["repository"] / spec.tokenizer_model(r.name) / "1" / "tokenizer", r.max_length)
    enc = tok.encode(["東京"], ["京都"])
    types = enc.token_type_ids[0]
    assert types[0] == 0 and types[-1] == 1


def test_detect_task(tiny_dirs):
    for key in SERVED.values():
        assert export.load.detect_task(str(tiny_dirs[key])) == key.split("_")[0]


def test_modernbert_attention_operators_only_where_checked():
    """onnxruntime's attention operators for ModernBERT on the CPU in fp32 and int8 only, with the rotary embedding they
    compute and the two kinds of layer whose masks export builds: not for fp16 or the GPU, other architectures, scaled
    rotary positions or another kind of layer."""
    from transformers import BertConfig, ModernBertConfig

    from export import modernbert

    config = ModernBertConfig(num_hidden_layers=3)
    assert modernbert.applies(config, "fp32", "cpu") and modernbert.applies(config, "int8", "cpu")
    assert not modernbert.applies(config, "fp16", "cpu") and not modernbert.applies(config, "fp32", "gpu")
    assert not modernbert.applies(BertConfig(), "fp32", "cpu")
    other = ModernBertConfig(num_hidden_layers=3)
    other.layer_types = [*other.layer_types[:2], "chunked_attention"]
    other.rope_parameters["chunked_attention"] = other.rope_parameters["full_attention"]
    assert not modernbert.applies(other, "fp32", "cpu")
    config.rope_parameters["sliding_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert not modernbert.applies(config, "fp32", "cpu")


def test_modernbert_attention_traced_without_a_mask_says_so(tiny_dirs):
    """The traced attention takes its key padding mask from the model's attention mask; a model called without one
    stops the export with that said, not with an error deep in the trace."""
    import torch

    from export import modernbert

    source = export.load.load(str(tiny_dirs["embed_v3"]), "embed")
    model = next(m for m in source.model.modules() if type(m).__name__ == "ModernBertModel")
    with modernbert.traced_with_fused_attention(source.hf_config), pytest.raises(RuntimeError, match="attention mask"):
        model(input_ids=torch.ones(1, 4, dtype=torch.int64), attention_mask=None)


def test_modernbert_attention_operators_keep_positions_and_windows(tiny_dirs, tmp_path):
    """The tiny model's random weights give nearly uniform attention, under which rotary positions hardly move the
    output. Sharpened, a wrong rotary base for the local layers moves it by 5e-2 (checked), far past parity's 1e-4: export
    must pass parity with ModernBERT's attention as onnxruntime's operators on inputs longer than the local window."""
    import onnx
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_dirs["embed_v3"]), device="cpu")
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "Wqkv"):
                module.Wqkv.weight.mul_(30)
    model.save(str(tmp_path / "sharp"))
    lines: list[str] = []
    opts = ExportOptions(model=str(tmp_path / "sharp"), task="embed", name="sharp/v3", repository=tmp_path / "repo")
    s = run_export(opts, log=lines.append)
    assert any("-> PASS" in line for line in lines) and not any("FAIL" in line for line in lines), "\n".join(lines)
    ops = [n.op_type for n in onnx.load(str(spec.encoder_file(tmp_path / "repo", s.name))).graph.node]
    assert ops.count("MultiHeadAttention") == tiny_models.LAYERS_V3


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("key", ["embed", "rerank", "embed_v3", "rerank_v3"])
def test_other_precisions(tiny_dirs, tmp_path, key, precision):
    task = key.split("_")[0]
    lines: list[str] = []
    opts = ExportOptions(model=str(tiny_dirs[key]), task=task, name=f"p/{key}", repository=tmp_path / "repo", precision=precision)
    s = run_export(dataclasses.replace(opts, openvino_int8=precision == "int8"), log=lines.append)
    assert s.precision == precision
    text = "\n".join(lines)
    assert "PASS" in text, text
    print(f"{key} {precision}:", *(line.strip() for line in lines if "max |diff|" in line or "min cosine" in line))
    if precision == "int8":
        assert "min_cosine ≥ 0.95 -> PASS" in text or "max_abs_diff ≤ 0.1 -> PASS" in text
        # OpenVINO's own int8 beside onnxruntime's, checked against its own tolerance, and what parity passed recorded.
        folder = spec.encoder_file(tmp_path / "repo", s.name).parent
        assert (folder / spec.OPENVINO_INT8_FILE).exists() and (folder / "openvino-int8.bin").exists()
        assert "openvino int8 (NNCF" in text and ("min_cosine ≥ 0.99 -> PASS" in text or "max_abs_diff ≤ 0.05 -> PASS" in text)
        assert set(json.loads((folder / "engines.json").read_text())) == {"onnxruntime", "openvino-int8"}
    enc = parse((tmp_path / "repo" / spec.encoder_model(s.name) / "config.pbtxt").read_text())
    assert enc.backend == "onnxruntime" and enc.default_model_filename == "model.onnx"
    assert not (tmp_path / "repo" / enc.name / "1" / "model.py").exists()
    assert not s.ragged  # the ONNX Runtime backend runs each request as it comes


def test_int8_calibration_takes_the_users_text_too(tiny_dirs, tmp_path):
    from export import calibration

    texts = tmp_path / "texts.txt"
    texts.write_text(
        "\n".join(f"{n}番目の文書は、検索で使われる文章の例です。" * (n + 1) for n in range(12)) + "\n\n", encoding="utf-8"
    )
    assert len(calibration.read(texts)) == 12  # blank lines skipped
    bom = tmp_path / "bom.txt"
    bom.write_text("\ufeff最初の行\n", encoding="utf-8")
    assert calibration.read(bom) == ["最初の行"]
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text in it"):
        calibration.read(tmp_path / "empty.txt")
    lines: list[str] = []
    opts = ExportOptions(model=str(tiny_dirs["rerank"]), task="rerank", repository=tmp_path / "repo", precision="int8")
    s = run_export(dataclasses.replace(opts, openvino_int8=True, calibration=texts), log=lines.append)
    # A cross-encoder's lines are documents, each paired with every parity query: 3 x (9 built-in + 12) pairs.
    assert f"NNCF, {-(-3 * 21 // calibration.BATCH)} calibration batches" in "\n".join(lines)
    assert s.precision == "int8"
    # More text than NNCF should take is sampled down to MAX_BATCHES full batches.
    tokenizer = Tokenizer(spec.tokenizer_files(tmp_path / "repo", s.name), s.max_length)
    many = calibration.batches(s, tokenizer, ["短い文書。"] * (calibration.BATCH * calibration.MAX_BATCHES))
    assert len(many) == calibration.MAX_BATCHES and all(len(b[spec.INPUT_IDS]) == calibration.BATCH for b in many)


def test_a_failed_openvino_int8_fails_the_export_and_leaves_no_part_of_it(tiny_dirs, tmp_path, monkeypatch):
    import export.convert

    def broken(src, dst, batches):
        dst.write_text("<half written>")
        dst.with_suffix(".bin").write_bytes(b"\0")
        raise MemoryError("NNCF ran out")

    monkeypatch.setattr(export.convert, "to_openvino_int8", broken)
    opts = ExportOptions(
        model=str(tiny_dirs["embed"]), task="embed", name="p/broken", repository=tmp_path / "repo", precision="int8"
    )
    with pytest.raises(RuntimeError, match=r"OpenVINO int8 .* could not be made: MemoryError: NNCF ran out"):
        run_export(dataclasses.replace(opts, openvino_int8=True), log=lambda line: None)
    # Nothing of it reaches the repository: its checks run before it is put in place.
    assert not list((tmp_path / "repo").iterdir())


def test_parity_failure_exits_non_zero(tiny_dirs, tmp_path, monkeypatch):
    real_load = export.load.load

    def skewed(*args, **kwargs):
        source = real_load(*args, **kwargs)
        reference = source.reference
        source.reference = lambda items, prompt="": reference(items, prompt) + 1e-3  # a model that is off by 1e-3
        return source

    monkeypatch.setattr(export.load, "load", skewed)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["export", "--model", str(tiny_dirs["embed"]), "--task", "embed", "--repository", str(tmp_path)])
    assert code == 1
    assert "beyond tolerance" in err.getvalue()
    with pytest.raises(ParityError):
        run_export(ExportOptions(model=str(tiny_dirs["embed"]), task="embed", repository=tmp_path), log=lambda _: None)


def test_parity_report_logic():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert compare(ref, ref) == (0.0, 1.0)
    diff, cos = compare(ref, ref + np.array([[0.0, 1.0], [0.0, 0.0]]))
    assert diff == 1.0 and cos == pytest.approx(np.sqrt(0.5))
    assert compare(ref, ref[:1])[0] == float("inf")
    ok = Report("fp32", "embed", 2, True, 5e-5, 1.0, "max_abs_diff", 1e-4)
    assert ok.ok and not Report("fp32", "embed", 2, False, 0.0, 1.0, "max_abs_diff", 1e-4).ok
    assert not Report("fp16", "embed", 2, True, 0.1, 0.99, "min_cosine", 0.999).ok
    # A limit of None is reported, not held; but NaN (or outputs of the wrong shape) never passes.
    assert Report("int8", "embed", 2, True, 0.2, 0.998, "min_cosine", None).ok
    # int8 has a coarse floor: a conversion that pools wrong (cosine 0.37 in review) is not published.
    min_cosine, floor = TOLERANCE[("int8", "embed")]
    assert not Report("int8", "embed", 2, True, 0.5, 0.37, min_cosine, floor).ok
    assert not Report("int8", "embed", 2, True, float("nan"), float("nan"), "min_cosine", None).ok
    assert not Report("int8", "rerank", 2, True, float("inf"), 1.0, "max_abs_diff", None).ok


@pytest.mark.parametrize(
    ("name", "told"),
    [
        ("a b", "use letters"),
        # Both are a--b in Triton: the second export replaced the first without a word (review).
        ("a--b", "same model as 'a/b'"),
        # Exported once, then every export again failed after the slow steps: a folder name past 255 bytes (review).
        ("x" * 200, "at most 128"),
    ],
)
def test_bad_served_name_fails_before_loading(tmp_path, name, told):
    with pytest.raises(ValueError, match=told):
        run_export(ExportOptions(model="/nonexistent", task="embed", name=name, repository=tmp_path), log=lambda _: None)


def test_a_file_for_a_model_is_told_so(tiny_dirs, tmp_path):
    # It said "cannot serve a model named '/.../config.json'" (review).
    with pytest.raises(ValueError, match="is a file: pass the folder"):
        run_export(ExportOptions(model=str(tiny_dirs["embed"] / "config.json"), task="embed", repository=tmp_path))


@pytest.mark.parametrize(("key", "task", "told"), [("embed", "rerank", "--task embed"), ("rerank_v3", "embed", "--task rerank")])
def test_a_task_unlike_the_models_is_refused(tiny_dirs, tmp_path, key, task, told):
    # An embedder exported as a reranker got a random head, passed parity (against the same random head) and was
    # served (review).
    with pytest.raises(ValueError, match=told):
        run_export(ExportOptions(model=str(tiny_dirs[key]), task=task, repository=tmp_path), log=lambda _: None)
    assert not list(tmp_path.iterdir())


def test_tensorrt_is_refused_past_the_warmed_up_context(tiny_dirs, tmp_path):
    # Warm-up builds TensorRT's engines for shapes up to 1,024 tokens; a longer input built them again while serving,
    # minutes during which the one encoder instance answered nothing (a Triton config review). ruri v3 takes 8,192.
    options = ExportOptions(
        model=str(tiny_dirs["embed_v3"]), task="embed", repository=tmp_path, device="gpu", precision="fp16", tensorrt=True
    )
    with pytest.raises(ValueError, match="--max-length 1024 or less"):
        run_export(options, log=lambda _: None)
    assert not list(tmp_path.iterdir())


def test_a_context_past_the_models_positions_is_refused(tiny_dirs, tmp_path):
    # It exported, and the engine failed at the first input that long (index out of range).
    with pytest.raises(ValueError, match="--max-length 100000"):
        options = ExportOptions(model=str(tiny_dirs["embed"]), task="embed", repository=tmp_path, max_length=100_000)
        run_export(options, log=lambda _: None)
    assert not list(tmp_path.iterdir())


def test_a_models_own_context_past_its_positions_is_refused(tiny_dirs, tmp_path):
    # Its max_seq_length past the positions: a 40-line traceback out of the parity check (review).
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["embed"], model)
    config = json.loads((model / "sentence_bert_config.json").read_text())
    (model / "sentence_bert_config.json").write_text(json.dumps({**config, "max_seq_length": 100_000}))
    with pytest.raises(ValueError, match=r"sets max_seq_length 100000, past its .* --max-length"):
        run_export(ExportOptions(model=str(model), task="embed", repository=tmp_path / "repo"), log=lambda _: None)


def _xlm_roberta(folder: Path, tokenizer_from: Path, positions: int, rerank: bool) -> int:
    """A tiny XLM-R (multilingual-e5's architecture) saved in ``folder``; returns its padding id."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=1,
        num_labels=1,
    )
    model = XLMRobertaForSequenceClassification(config) if rerank else XLMRobertaModel(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return int(tokenizer.pad_token_id)


@pytest.mark.parametrize("task", ["embed", "rerank"])
def test_roberta_style_positions_start_past_the_padding_id(tiny_dirs, tmp_path, task):
    # XLM-R numbers its positions from padding id + 1: --max-length 40 passed and the parity check ended in a traceback
    # (index out of range in the position embeddings; review).
    pad = _xlm_roberta(tmp_path / "m", tiny_dirs["embed_v3"], positions=40, rerank=task == "rerank")
    usable = 40 - pad - 1
    with pytest.raises(ValueError, match=f"takes 2 to {usable} tokens"):
        options = ExportOptions(model=str(tmp_path / "m"), task=task, repository=tmp_path / "repo", max_length=40)
        run_export(options, log=lambda _: None)
    if task == "embed":  # the last position that fits is taken, and serves as sentence-transformers does
        options = ExportOptions(model=str(tmp_path / "m"), task=task, repository=tmp_path / "repo", max_length=usable)
        assert run_export(options, log=lambda _: None).max_length == usable


def test_a_model_sentence_transformers_cannot_export_is_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    # Both ended in a traceback (review): a first module with no transformer inside, and a setting that
    # sentence-transformers itself fails on with ruri v1's tokenizer.
    import json
    import shutil

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer as FastTokenizer

    fast = FastTokenizer.from_file(str(tiny_dirs["embed_v3"] / "tokenizer.json"))
    SentenceTransformer(modules=[StaticEmbedding(fast, embedding_dim=8)], device="cpu").save(str(tmp_path / "static"))
    lower = tmp_path / "lower"
    shutil.copytree(tiny_dirs["embed"], lower)
    config = json.loads((lower / "sentence_bert_config.json").read_text())
    (lower / "sentence_bert_config.json").write_text(json.dumps({**config, "do_lower_case": True}))
    for model, told in [("static", "begins with StaticEmbedding"), ("lower", "sentence-transformers cannot load")]:
        args = ["export", "--model", str(tmp_path / model), "--task", "embed", "--repository", str(tmp_path / "repo")]
        assert main(args) == 1
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # transformers' progress bars too
        assert told in line and "Traceback" not in err, err


def test_reexport_replaces_in_place(tiny_dirs, tmp_path):
    import os
    import tempfile

    # A work folder that an export killed hard left behind (its ONNX files: gigabytes for ruri-large) goes.
    left = Path(tempfile.gettempdir()) / f"fos-export-{gone_pid()}-test"
    left.mkdir(exist_ok=True)
    repo = tmp_path / "repo"
    for _ in range(2):
        run_export(
            ExportOptions(model=str(tiny_dirs["rerank"]), task="rerank", name="again", repository=repo), log=lambda _: None
        )
    assert not left.exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"fos-export-{os.getpid()}-*"))
    assert sorted(p.name for p in repo.iterdir()) == ["again", "again__encoder", "again__tokenizer"]
    assert not list(tmp_path.glob(".*staging*"))
    # An export that fails parity leaves the earlier one as it was: it used to replace it first, and be served.
    (before,) = read_specs(repo)
    record = (repo / "again__encoder" / "1" / "engines.json").read_text()
    failing = {**parity.TOLERANCE, ("fp32", "rerank"): ("max_abs_diff", -1.0)}
    with mock.patch.object(parity, "TOLERANCE", failing), pytest.raises(ParityError):
        options = ExportOptions(model=str(tiny_dirs["rerank"]), task="rerank", name="again", repository=repo, max_length=16)
        run_export(options, log=lambda _: None)
    assert read_specs(repo) == [before] and before.max_length != 16
    assert (repo / "again__encoder" / "1" / "engines.json").read_text() == record
    assert sorted(p.name for p in repo.iterdir()) == ["again", "again__encoder", "again__tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or set-aside folder left


def _model_set(folder: Path, name: str, which: str) -> None:
    for d in (name, spec.tokenizer_model(name), spec.encoder_model(name)):
        (folder / d / "1").mkdir(parents=True)
        (folder / d / "which").write_text(which)
    (folder / name / "config.pbtxt").write_text(which)


def _served_sets(repo: Path, name: str) -> list[str]:
    """The export each model folder comes from, where the ensemble is there to serve them."""
    if not (repo / name / "config.pbtxt").exists():
        return []
    folders = (repo / d for d in (name, spec.tokenizer_model(name), spec.encoder_model(name)))
    return [(f / "which").read_text() if f.exists() else "absent" for f in folders]


def test_publish_never_leaves_a_served_mix_of_two_exports(tmp_path, monkeypatch):
    # A kill between two moves runs no clean-up: what is in the repository then is what gets served. The ensemble
    # used to stay until the tokenizer and encoder were replaced (a helper's kill served cosine 0.884 embeddings).
    from export import repository as publishing

    real_move = publishing.shutil.move
    states: list[list[str]] = []

    def move(src, dst):
        real_move(src, dst)
        states.append(_served_sets(repo, "m"))

    repo, staging = tmp_path / "repo", tmp_path / "staging"
    _model_set(repo, "m", "old")
    _model_set(staging, "m", "new")
    monkeypatch.setattr(publishing.shutil, "move", move)
    publishing.publish(staging, repo, "m")
    assert all(len(set(state)) <= 1 for state in states), states
    assert states[-1] == ["new"] * 3


@pytest.mark.parametrize("failing", range(6))
def test_a_failed_publish_puts_the_old_export_back(tmp_path, monkeypatch, failing):
    from export import repository as publishing

    real_move = publishing.shutil.move
    calls = []

    def move(src, dst):
        calls.append(src)
        if len(calls) == failing + 1:
            raise OSError("disk full")
        real_move(src, dst)

    repo, staging = tmp_path / "repo", tmp_path / "staging"
    _model_set(repo, "m", "old")
    _model_set(staging, "m", "new")
    monkeypatch.setattr(publishing.shutil, "move", move)
    with pytest.raises(OSError, match="disk full"):
        publishing.publish(staging, repo, "m")
    assert _served_sets(repo, "m") == ["old"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "staging"]


def test_each_export_stages_apart_and_publishes_alone(tmp_path, monkeypatch):
    # Two exports of one name at once shared one staging folder: one published what the other had written and not yet
    # checked, and reported success (review). Staging folders are now each export's own, and publishing is one at a
    # time.
    import threading
    import time

    from export import repository as publishing

    repo = tmp_path / "repo"
    with publishing.staging_for(repo, "m") as a, publishing.staging_for(repo, "m") as b:
        assert a != b and Path(a).parent == Path(b).parent == tmp_path
    left = tmp_path / f".repo.m.staging-{gone_pid()}-x"  # an export killed hard
    left.mkdir()
    with publishing.staging_for(repo, "m"):
        assert not left.exists()

    _model_set(repo, "m", "old")
    _model_set(tmp_path / "staging", "m", "new")
    said: list[str] = []
    with publishing._publishing(repo.resolve()):
        other = threading.Thread(target=publishing.publish, args=(tmp_path / "staging", repo, "m", said.append))
        other.start()
        time.sleep(0.5)
        assert _served_sets(repo, "m") == ["old"] * 3  # it waits, and says so
        assert said and "waiting for another export" in said[0]
    other.join(timeout=10)
    assert _served_sets(repo, "m") == ["new"] * 3


def test_the_current_folder_as_repository_keeps_exports_work_outside_it(tmp_path, monkeypatch):
    # `--repository .`: Path(".").name is "", so the set-aside and staging folders went inside the repository, where a
    # kill left a folder that fos serve read as a model (review).
    from export import repository as publishing

    repo = tmp_path / "repo"
    _model_set(repo, "m", "old")
    _model_set(tmp_path / "staging", "m", "new")
    (tmp_path / ".repo.m__encoder.replaced").mkdir()  # left by a publish killed before
    monkeypatch.chdir(repo)
    with publishing.staging_for(Path("."), "m") as staged:
        assert Path(staged).parent == tmp_path
    publishing.publish(tmp_path / "staging", Path("."), "m")
    assert sorted(p.name for p in repo.iterdir()) == ["m", "m__encoder", "m__tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "staging"]


def test_serve_exports_what_the_repository_lacks(tiny_dirs, tmp_path, capsys):
    from shim.serve import ensure_exported

    repo = tmp_path / "repo"
    ensure_exported([str(tiny_dirs["rerank"])], repo, "fp32")
    first = capsys.readouterr().out
    assert "exporting it (task rerank, fp32)" in first and "PASS" in first
    specs = read_specs(repo)
    assert [s.served_name for s in specs] == [tiny_dirs["rerank"].name]  # a local directory serves under its name
    ensure_exported([str(tiny_dirs["rerank"])], repo, "fp32")
    assert "already in" in capsys.readouterr().out
    # Offline, a directory served under the id clients ask for (Dify's model name).
    ensure_exported([f"cl-nagoya/ruri-reranker-large={tiny_dirs['rerank']}"], repo, None)
    assert "exporting it (task rerank, fp32)" in capsys.readouterr().out
    assert sorted(s.served_name for s in read_specs(repo)) == sorted([tiny_dirs["rerank"].name, "cl-nagoya/ruri-reranker-large"])
    # The same name from another source is that source's model, not the old export under the asked-for name.
    ensure_exported([f"cl-nagoya/ruri-reranker-large={tiny_dirs['embed']}"], repo, None)
    assert "was exported from" in capsys.readouterr().out
    (moved,) = [s for s in read_specs(repo) if s.served_name == "cl-nagoya/ruri-reranker-large"]
    assert moved.task == "embed" and Path(moved.source).resolve() == tiny_dirs["embed"].resolve()
    ensure_exported([f"cl-nagoya/ruri-reranker-large={tiny_dirs['embed']}/."], repo, None)  # the same folder, spelt otherwise
    assert "already in" in capsys.readouterr().out
    # A model whose encoder is gone (removed by hand, a copy cut short) is exported again, not loaded into a traceback;
    # served as it is, it is refused in one line before anything loads.
    spec.encoder_file(repo, spec.triton_name(tiny_dirs["rerank"].name)).unlink()
    assert main(["serve", "--repository", str(repo)]) == 1
    err = capsys.readouterr().err
    assert f"{tiny_dirs['rerank'].name} in {repo} lacks its encoder" in err and "Traceback" not in err
    ensure_exported([str(tiny_dirs["rerank"])], repo, "fp32")
    assert "lacks its encoder" in capsys.readouterr().out
    assert spec.encoder_file(repo, spec.triton_name(tiny_dirs["rerank"].name)).exists()
    # And one whose config cannot be read: a traceback from protobuf before.
    config = repo / spec.triton_name(tiny_dirs["rerank"].name) / "config.pbtxt"
    config.write_text(config.read_text()[:200])
    assert main(["serve", "--repository", str(repo)]) == 1
    err = capsys.readouterr().err
    assert f"{config} cannot be read" in err and "Traceback" not in err
    ensure_exported([str(tiny_dirs["rerank"])], repo, "fp32")
    assert "lacks a readable" in capsys.readouterr().out
    assert read_specs(repo)


def test_serve_never_serves_another_precision_than_asked(tiny_dirs, tmp_path, capsys):
    # `fos serve --model X --precision int8` used to serve the fp32 export X already had.
    from shim.serve import ensure_exported

    repo, model = tmp_path / "repo", str(tiny_dirs["embed"])
    # An fp32 export with choices of its own, which a new precision must not undo.
    options = ExportOptions(
        model=model,
        task="embed",
        name="org/m",
        repository=repo,
        encoder_backend="python",
        prompts={"query": "q: "},
        engine="openvino-fp32",  # of fp32 exports only: the int8 export below cannot keep it
        tokenizer_instances=3,
        encoder_instances=2,
    )
    run_export(options, log=lambda _: None)
    ensure_exported([f"org/m={model}"], repo, None)  # no precision asked: whatever is there
    assert "already in" in capsys.readouterr().out
    ensure_exported([f"org/m={model}"], repo, "int8")
    assert "fp32, not int8: exporting it again" in capsys.readouterr().out
    (s,) = read_specs(repo)
    assert s.precision == "int8" and s.prompts["query"] == "q: " and s.served_name == "org/m" and s.engine == "auto"
    encoder = parse((repo / spec.encoder_model(s.name) / "config.pbtxt").read_text())
    tokenizer = parse((repo / spec.tokenizer_model(s.name) / "config.pbtxt").read_text())
    assert encoder.backend == "python" and (tokenizer.instance_group[0].count, encoder.instance_group[0].count) == (3, 2)
    ensure_exported([f"org/m={model}"], repo, "int8")
    assert "already in" in capsys.readouterr().out


def test_serve_exports_openvinos_int8_again_from_another_source(tiny_dirs, tmp_path, capsys):
    # The AMX setup: an int8 export served by OpenVINO's own int8. Exporting the name again from another folder kept
    # --engine openvino-int8 without --openvino-int8, which export refuses: fos serve failed to start.
    import shutil

    from shim.serve import ensure_exported

    repo, model = tmp_path / "repo", str(tiny_dirs["embed"])
    options = ExportOptions(
        model=model, task="embed", name="org/m", repository=repo, precision="int8", openvino_int8=True, engine="openvino-int8"
    )
    run_export(options, log=lambda _: None)
    moved = shutil.copytree(tiny_dirs["embed"], tmp_path / "moved")
    ensure_exported([f"org/m={moved}"], repo, None)
    assert "was exported from" in capsys.readouterr().out
    (s,) = read_specs(repo)
    assert s.engine == "openvino-int8" and spec.openvino_int8_file(spec.encoder_file(repo, s.name)).exists()


def _prompts(own: dict[str, str], model: str, default: str | None = None, pools_prompt: bool = True, **opts):
    from types import SimpleNamespace

    from export.main import prompts_of

    source = SimpleNamespace(prompts=own, default_prompt_name=default, pools_prompt=pools_prompt)
    return prompts_of(source, ExportOptions(model=model, task="embed", **opts))


def test_prompts_come_from_the_model_then_its_id_then_the_user():
    empty = {"query": "", "document": ""}  # what sentence-transformers has for a model without prompts
    ruri_v1 = {"query": "クエリ: ", "document": "文章: "}
    assert _prompts(empty, "cl-nagoya/ruri-large") == {"prompts": ruri_v1, "default_prompt_name": None}
    assert _prompts(empty, "someone/bert")["prompts"] == empty
    # Offline, ruri is a directory served under its id (fos serve --model ID=DIR): it lost its prompts (review).
    assert _prompts(empty, "/models/large", name="cl-nagoya/ruri-large")["prompts"] == ruri_v1
    assert _prompts(empty, "/models/x", name="cl-nagoya/ruri-v3-310m")["prompts"] == spec.RURI_V3_PROMPTS
    # A fine-tuned copy or a mirror of ruri v3: its own prompts, whatever its name.
    own = {**empty, "query": "問: ", "document": "答: "}
    assert _prompts(own, "cl-nagoya/ruri-v3-310m")["prompts"] == own
    assert _prompts(own, "/models/my-ruri", default="document")["default_prompt_name"] == "document"
    # The user's prompts replace those of the same name; the default may be set or cleared.
    got = _prompts(own, "x", default="document", prompts={"query": "Q: ", "extra": "E: "}, default_prompt_name="")
    assert got == {"prompts": {"query": "Q: ", "document": "答: ", "extra": "E: "}, "default_prompt_name": None}
    assert _prompts(own, "x", default_prompt_name="query")["default_prompt_name"] == "query"
    with pytest.raises(ValueError, match="not one of the model's prompts"):
        _prompts(own, "x", default_prompt_name="nonsense")


def test_prompts_are_refused_where_pooling_leaves_them_out(tiny_dirs, tmp_path):
    import shutil

    # The served graph pools the prompt's tokens too. The model's own prompts were checked, but not those that --prompt
    # adds (review) or that ruri's id brings; and the check had no test.
    empty = {"query": "", "document": ""}
    for own, model, opts in [
        ({**empty, "query": "Q: "}, "x", {}),
        (empty, "x", {"prompts": {"query": "Q: "}}),
        (empty, "cl-nagoya/ruri-large", {}),
    ]:
        with pytest.raises(ValueError, match=r"include_prompt=false.*\(query"):
            _prompts(own, model, pools_prompt=False, **opts)
    assert _prompts(empty, "x", pools_prompt=False)["prompts"] == empty
    assert export.load.load(str(tiny_dirs["embed"]), "embed").pools_prompt
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["embed"], model)
    pooling = json.loads((model / "1_Pooling" / "config.json").read_text())
    (model / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": False}))
    assert not export.load.load(str(model), "embed").pools_prompt


def test_cli_prompt_flags_reach_the_spec_and_parity(tiny_dirs, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "export",
                "--model",
                str(tiny_dirs["embed_v3"]),
                "--task",
                "embed",
                "--name",
                "v3/custom",
                "--repository",
                str(tmp_path),
                "--prompt",
                "query=質問: ",
                "--prefix",  # the older spelling
                "title=題: ",
                "--default-prompt",
                "document",
            ]
        )
    assert code == 0, out.getvalue()
    (s,) = read_specs(tmp_path)
    assert s.prompts == {"query": "質問: ", "document": "検索文書: ", "topic": "トピック: ", "title": "題: "}
    assert s.default_prompt_name == "document"
    assert "prompts query, document, topic, title" in out.getvalue() and "PASS" in out.getvalue()

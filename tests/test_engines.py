"""The engine choice (fos_runtime.engines): what auto and explicit choices serve on CPUs with and without bf16 units,
what export's parity check records, and that OpenVINO computes in the precision it was asked for, on any CPU."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest

from fos_runtime import encoder, engines, padding, spec
from fos_runtime.cores import available_cores
from fos_runtime.encoder import Encoder
from fos_runtime.engines import Choice, Cpu, NotServable, resolve
from fos_runtime.tokenization import Tokenizer
from shim.repository import read_specs

from conftest import ENGINES
from helpers import EMBED, EMBED_V3, RERANK, RERANK_V3, ServerThread, padded_batch

BF16_CPU = Cpu(bf16_flags=("amx_bf16",), openvino=True, openvino_bf16=True)
AVX2_CPU = Cpu(bf16_flags=(), openvino=True, openvino_bf16=False)
AVX512_CPU = Cpu(bf16_flags=(), openvino=True, openvino_bf16=False, avx512=True)  # an Ice Lake Xeon, a VM hiding AMX
NO_OPENVINO = Cpu(bf16_flags=("avx512_bf16",), openvino=False, openvino_bf16=False)
ALL_CHECKED = {"onnxruntime": {}, "openvino-fp32": {}, "openvino-bf16": {}}
HERE = Cpu.detect()


def folder_with(tmp_path, record: dict | None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if record is not None:
        engines.write_record(tmp_path, record)
    return tmp_path


def test_auto_serves_bf16_only_where_the_cpu_has_units_and_parity_passed_it(tmp_path):
    folder = folder_with(tmp_path, ALL_CHECKED)
    assert resolve("auto", folder, "fp32", gpu=False, cpu=BF16_CPU)[0] == Choice("openvino", "bf16")
    # No bf16 units (an AVX2-only EPYC): today's behaviour, onnxruntime.
    assert resolve("auto", folder, "fp32", gpu=False, cpu=AVX2_CPU)[0] == Choice("onnxruntime", "fp32")
    # AVX-512 without bf16 units: OpenVINO f32, where parity passed it; else onnxruntime.
    assert resolve("auto", folder, "fp32", gpu=False, cpu=AVX512_CPU)[0] == Choice("openvino", "fp32")
    ort_only = folder_with(tmp_path / "ort", {"onnxruntime": {}})
    assert resolve("auto", ort_only, "fp32", gpu=False, cpu=AVX512_CPU)[0] == Choice("onnxruntime", "fp32")
    assert resolve("auto", folder, "int8", gpu=False, cpu=AVX512_CPU)[0] == Choice("onnxruntime", "int8")
    assert resolve("auto", folder, "fp32", gpu=True, cpu=AVX512_CPU)[0] == Choice("onnxruntime", "fp32")
    # The CPU says bf16 but OpenVINO does not list it (or the other way round): no bf16.
    half = Cpu(bf16_flags=("avx512_bf16",), openvino=True, openvino_bf16=False)
    assert resolve("auto", folder, "fp32", gpu=False, cpu=half)[0].engine == "onnxruntime"
    assert resolve("auto", folder, "fp32", gpu=False, cpu=NO_OPENVINO)[0].engine == "onnxruntime"
    # On a GPU only onnxruntime runs.
    assert resolve("auto", folder, "fp32", gpu=True, cpu=BF16_CPU)[0] == Choice("onnxruntime", "fp32")


def test_auto_serves_only_what_parity_passed(tmp_path):
    # Exported before engines were checked (no record), or on a CPU without bf16 units (bf16 not in it): onnxruntime.
    assert resolve("auto", folder_with(tmp_path / "a", None), "fp32", gpu=False, cpu=BF16_CPU)[0].engine == "onnxruntime"
    fp32_only = folder_with(tmp_path, {"onnxruntime": {}, "openvino-fp32": {}})
    assert resolve("auto", fp32_only, "fp32", gpu=False, cpu=BF16_CPU) == (
        Choice("onnxruntime", "fp32"),
        "export's parity check did not pass OpenVINO bf16",  # export records only what passed
    )
    # A record cut short (or not one) stops the model from loading with what to do, not a traceback.
    for broken in ('{"onnxruntime": {', "[]"):
        (tmp_path / engines.RECORD).write_text(broken, encoding="utf-8")
        with pytest.raises(NotServable, match="export the model again"):
            resolve("auto", tmp_path, "fp32", gpu=False, cpu=BF16_CPU)
    # int8 and fp16 files run on onnxruntime as they are, whatever the CPU.
    for precision in ("int8", "fp16"):
        assert resolve("auto", tmp_path, precision, gpu=False, cpu=BF16_CPU)[0] == Choice("onnxruntime", precision)


def test_an_int8_exports_openvino_int8_is_served_only_when_asked_for(tmp_path):
    both = folder_with(tmp_path / "both", {"onnxruntime": {}, "openvino-int8": {}})
    choice, why = resolve("auto", both, "int8", gpu=False, cpu=BF16_CPU)
    assert choice == Choice("onnxruntime", "int8") and "fp32 exports only" in why
    # Asked for: an int8 export's OpenVINO is its int8, whatever the CPU; an fp32 export has none.
    assert resolve("openvino", both, "int8", gpu=False, cpu=AVX2_CPU)[0] == Choice("openvino", "int8")
    assert resolve("openvino-int8", both, "int8", gpu=False, cpu=AVX2_CPU)[0] == Choice("openvino", "int8")
    with pytest.raises(NotServable, match="serves int8 exports"):
        resolve("openvino-int8", folder_with(tmp_path / "fp32", ALL_CHECKED), "fp32", gpu=False, cpu=BF16_CPU)
    for asked in ("openvino-int8", "openvino"):  # made without --openvino-int8: says how to get it
        with pytest.raises(NotServable, match=r"has no OpenVINO int8 .*--openvino-int8"):
            resolve(asked, folder_with(tmp_path / "ort", {"onnxruntime": {}}), "int8", gpu=False, cpu=BF16_CPU)
    with pytest.raises(NotServable, match="on the GPU"):
        resolve("openvino-int8", both, "int8", gpu=True, cpu=BF16_CPU)


def test_explicit_choices(tmp_path):
    folder = folder_with(tmp_path, ALL_CHECKED)
    assert resolve("openvino", folder, "fp32", gpu=False, cpu=BF16_CPU)[0] == Choice("openvino", "bf16")
    assert resolve("openvino", folder, "fp32", gpu=False, cpu=AVX2_CPU)[0] == Choice("openvino", "fp32")
    assert resolve("openvino-fp32", folder, "fp32", gpu=False, cpu=BF16_CPU)[0] == Choice("openvino", "fp32")
    assert resolve("onnxruntime", folder, "fp32", gpu=False, cpu=BF16_CPU)[0] == Choice("onnxruntime", "fp32")
    with pytest.raises(NotServable, match="no bf16 units"):
        resolve("openvino-bf16", folder, "fp32", gpu=False, cpu=AVX2_CPU)
    with pytest.raises(NotServable, match="parity check did not pass"):
        resolve("openvino-fp32", folder_with(tmp_path / "bf16", {"onnxruntime": {}}), "fp32", gpu=False, cpu=BF16_CPU)
    with pytest.raises(NotServable, match="parity check did not pass"):
        resolve("openvino", folder_with(tmp_path / "old", None), "fp32", gpu=False, cpu=BF16_CPU)
    with pytest.raises(NotServable, match="on the GPU"):
        resolve("openvino", folder, "fp32", gpu=True, cpu=BF16_CPU)
    with pytest.raises(NotServable, match="does not load"):
        resolve("openvino-fp32", folder, "fp32", gpu=False, cpu=NO_OPENVINO)
    with pytest.raises(NotServable, match="must be one of"):
        resolve("tensorflow", folder, "fp32", gpu=False, cpu=BF16_CPU)


def model_of(exported, served: str):
    s = next(s for s in read_specs(exported["repository"]) if s.served_name == served)
    return s, exported["repository"] / spec.encoder_model(s.name) / "1" / "model.onnx"


def feeds(exported, served: str):
    s, _ = model_of(exported, served)
    tokenizer = Tokenizer(exported["repository"] / spec.tokenizer_model(s.name) / "1" / "tokenizer", s.max_length)
    encoded = tokenizer.encode(["東京は日本の首都です。", "猫", "ラーメンと餃子を食べに行きませんか？" * 3])
    return padding.pad(encoded, s.pad_token_id, s.encoder_inputs)


def test_export_records_the_variants_parity_passed_on_this_cpu(exported):
    for served in (EMBED, RERANK, EMBED_V3, RERANK_V3):
        _, model = model_of(exported, served)
        record = json.loads((model.parent / engines.RECORD).read_text())
        expected = {"onnxruntime", "openvino-fp32"} | ({"openvino-bf16"} if HERE.bf16 else set())
        assert set(record) == expected, served
        if HERE.bf16:
            assert record["openvino-bf16"]["compute"] == "bf16"
    printed = exported["printed"]["embed"]
    assert "parity (openvino fp32 on the fp32 export" in printed
    if not HERE.bf16:
        assert "parity (openvino bf16 on the fp32 export): not run on this machine" in printed


@pytest.mark.parametrize("served", [EMBED, EMBED_V3])
def test_openvino_fp32_computes_fp32_on_any_cpu(exported, served):
    # Left without a precision, OpenVINO computes bf16 on a CPU with bf16 units: fp32 must be asked for, and be what runs.
    _, model = model_of(exported, served)
    f = feeds(exported, served)
    reference = Encoder(model, engine="onnxruntime").run(f)
    ov = Encoder(model, engine="openvino-fp32")
    assert ov.engine == Choice("openvino", "fp32") and ov.device == "cpu"
    assert ov._openvino is not None
    assert ov._openvino.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert np.max(np.abs(ov.run(f) - reference)) <= 1e-5


def test_openvino_is_right_past_its_first_runs_length(exported):
    """OpenVINO 2026.4.1 computes attention without a mask (ruri v3's global layers) wrong at every later length from
    about 17 tokens if its first run had 1 token: here a max difference of 2.7, and 1e-7 after a first run of 2 or more.
    The encoder's first run, at load (``engines.first_run_feeds``), is what keeps requests off that path."""
    _, model = model_of(exported, EMBED_V3)
    f = padded_batch((200, 100, 3), ("input_ids", "attention_mask"))
    reference = Encoder(model, engine="onnxruntime").run(f)
    assert np.max(np.abs(Encoder(model, engine="openvino-fp32").run(f) - reference)) <= 1e-5


def test_auto_streams_split_many_cores_for_onnxruntimes_int8_only(exported):
    # Measured to gain on 16 AMX cores: onnxruntime's int8 (dify-embed 1.40x, batch-embed 1.24x with 4 streams).
    int8, fp32 = Choice("onnxruntime", "int8"), Choice("onnxruntime", "fp32")
    assert [encoder.auto_streams(int8, "cpu", n) for n in (1, 2, 7, 8, 12, 16, 64)] == [1, 2, 2, 2, 3, 4, 4]
    for other, device in ((fp32, "cpu"), (Choice("openvino", "int8"), "cpu"), (Choice("openvino", "bf16"), "cpu"), (int8, "gpu")):
        assert encoder.auto_streams(other, device, 16) == 1
    # The encoder asks it where streams are not given (fos serve's default), from the threads it runs.
    _, model = model_of(exported, EMBED)
    e = Encoder(model, engine="onnxruntime", precision="int8", threads=8, streams=None)
    assert (e.streams, e.run_threads) == (2, 4)
    assert Encoder(model, engine="onnxruntime", precision="fp32", threads=8, streams=None).streams == 1
    assert Encoder(model, engine="onnxruntime", precision="int8", threads=8).streams == 1  # asked for: one


class Meeting:
    """Wraps a stream's runner (an onnxruntime session or an OpenVINO infer request): each run waits at ``barrier``
    for another before it computes, and the ``fail``-th run raises."""

    def __init__(self, runner, barrier: threading.Barrier, used: set, fail: int | None = None, sleep: float = 0.0):
        self.runner, self.barrier, self.used, self.fail, self.sleep = runner, barrier, used, fail, sleep

    def _call(self, method, *args, **kwargs):
        self.used.add(id(self.runner))
        self.barrier.wait()
        time.sleep(self.sleep)
        if self.fail is not None:
            self.fail -= 1
            if self.fail < 0:
                self.fail = None
                raise RuntimeError("a batch failed")
        return getattr(self.runner, method)(*args, **kwargs)

    def run(self, *args, **kwargs):  # onnxruntime
        return self._call("run", *args, **kwargs)

    def infer(self, *args, **kwargs):  # OpenVINO
        return self._call("infer", *args, **kwargs)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino-fp32"])
def test_streams_run_a_rounds_batches_at_once_each_on_its_own_runner(exported, engine):
    # Streams on a CPU with many cores: a round's small batches at once, each on its share of the cores. Runs on one
    # onnxruntime session share its one pool of threads, so each stream has a session of its own; OpenVINO, an infer
    # request a stream. Batches of different shapes: each answer must land where its batch was.
    _, model = model_of(exported, EMBED)
    f = feeds(exported, EMBED)
    batches = [{k: v[:n, :w] for k, v in f.items()} for n, w in ((3, 8), (1, f["input_ids"].shape[1]), (2, 5), (1, 3))]
    one = Encoder(model, engine=engine, threads=2)
    two = Encoder(model, engine=engine, threads=2, streams=2)
    assert (one.streams, one.run_threads, one.rounds_at_once) == (1, 2, 1)
    assert (two.streams, two.run_threads, two.rounds_at_once) == (2, 1, 2)  # the CPU plan's run cost follows a run's threads
    if engine == "onnxruntime":
        assert Encoder(model, engine=engine, threads=2, streams=3).streams == 2  # a thread a stream at least
    want = [one.run(b) for b in batches]
    assert np.max(np.abs(Encoder(model, engine="onnxruntime").run(batches[2]) - want[2])) <= 1e-5
    # Each run waits at the barrier for another: run one after the other, they would never meet (BrokenBarrierError).
    meeting, used = threading.Barrier(2, timeout=10), set()
    runners = [Meeting(two._idle.get(), meeting, used) for _ in range(2)]
    for runner in runners:
        two._idle.put(runner)
    got = two.run_many(batches)
    assert len(used) == 2
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.max(np.abs(g - w)) <= 1e-5 for g, w in zip(got, want, strict=True))
    # A failed batch fails the round, once every run of it has ended; the runners are all there for the next round.
    runners[0].fail = 0
    with pytest.raises(RuntimeError, match="a batch failed"):
        two.run_many(batches[:2])
    assert two._idle.qsize() == 2
    again = two.run_many(batches)
    assert all(np.max(np.abs(g - w)) <= 1e-5 for g, w in zip(again, want, strict=True))
    if engine == "onnxruntime":  # a real failure too (OpenVINO can crash natively on inputs pad never makes)
        bad = dict(batches[0], input_ids=batches[0]["input_ids"].astype(np.float32))
        with pytest.raises(Exception, match="data type"):
            two.run_many([bad, batches[1]])
        assert two._idle.qsize() == 2 and np.max(np.abs(two.run_many(batches)[1] - want[1])) <= 1e-5


def test_a_lone_batch_runs_over_every_thread_while_no_stream_runs(exported, monkeypatch):
    # A round of one run (a lone Dify query at low load) on one stream's thread would leave the other cores idle.
    _, model = model_of(exported, EMBED)
    f = feeds(exported, EMBED)
    two = Encoder(model, engine="onnxruntime", threads=2, streams=2)
    assert two._wide is not None and Encoder(model, engine="onnxruntime", threads=2)._wide is None
    assert two.lone_run_threads == 2
    used: list = []
    real = two._run_session
    monkeypatch.setattr(two, "_run_session", lambda session, batch: used.append(session) or real(session, batch))
    want = Encoder(model, engine="onnxruntime").run(f)
    assert np.max(np.abs(two.run_many([f])[0] - want)) <= 1e-5
    busy = two._idle.get()  # a stream computing another round's run: the lone batch takes the other stream
    assert np.max(np.abs(two.run_many([f])[0] - want)) <= 1e-5
    two._idle.put(busy)
    two.run_many([f, f])  # two batches: a stream each
    assert used[0] is two._wide and all(s is not two._wide for s in used[1:]) and len(used) == 4
    assert two._idle.qsize() == 2


def test_bf16_is_refused_where_openvino_would_emulate_it(exported, monkeypatch):
    # An AVX-512 CPU without bf16 units (an Ice Lake Xeon, or a VM hiding AMX): OpenVINO accepts the bf16 hint, says
    # bf16 runs and emulates it some 40 times slower than f32. Faked here so that every CPU checks the refusal.
    _, model = model_of(exported, EMBED)
    monkeypatch.setattr(engines.Cpu, "detect", classmethod(lambda cls: AVX512_CPU))
    with pytest.raises(NotServable, match="would emulate bf16"):
        Encoder(model, engine=Choice("openvino", "bf16"))


def test_bf16_runs_where_the_cpu_has_units_and_is_refused_elsewhere(exported):
    _, model = model_of(exported, EMBED)
    f = feeds(exported, EMBED)
    if HERE.bf16:
        got = Encoder(model, engine="openvino-bf16").run(f)
        want = Encoder(model, engine="onnxruntime").run(f)
        cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cosine.min() >= 0.999
        assert Encoder(model, engine="auto").engine == Choice("openvino", "bf16")
    else:  # OpenVINO would quietly compute f32: asked for bf16, the session refuses
        with pytest.raises(NotServable):
            Encoder(model, engine=Choice("openvino", "bf16"))
        with pytest.raises(NotServable, match="no bf16 units"):
            Encoder(model, engine="openvino-bf16")
        auto = Choice("openvino", "fp32") if HERE.avx512 and HERE.openvino else Choice("onnxruntime", "fp32")
        assert Encoder(model, engine="auto").engine == auto


def test_models_and_metrics_say_which_engine_runs(embedded_server, triton_server):
    models = {m["id"]: m for m in httpx.get(embedded_server.url + "/v1/models").json()["data"]}
    for served, key in ((EMBED, "embed"), (RERANK, "rerank"), (EMBED_V3, "embed_v3"), (RERANK_V3, "rerank_v3")):
        engine, _, compute = ENGINES[key].partition("-")
        assert (models[served]["engine"], models[served]["compute_precision"]) == (engine, compute or "fp32")
        assert models[served]["precision"] == "fp32"
    metrics = httpx.get(embedded_server.url + "/metrics").text
    threads = models[EMBED]["engine_threads"]
    assert threads == available_cores() and models[EMBED]["engine_streams"] == 1  # every core, one run at a time
    info = f'compute_precision="fp32",engine="openvino",export_precision="fp32",model="{EMBED}",streams="1",threads="{threads}"'
    assert f"fos_engine_info{{{info}}} 1.0" in metrics
    # Behind Triton the shim cannot know (Triton's log says); the export's precision it does know.
    models = {m["id"]: m for m in httpx.get(triton_server.url + "/v1/models").json()["data"]}
    assert "engine" not in models[EMBED] and "engine_threads" not in models[EMBED] and models[EMBED]["precision"] == "fp32"


def test_triton_python_encoder_runs_the_exported_engine(triton, tmp_path_factory):
    grpc_port = triton["grpc"].rsplit(":", 1)[1]
    logs = list(tmp_path_factory.getbasetemp().glob(f"**/triton-{grpc_port}/tritonserver-*.log"))
    log = "".join(path.read_text(errors="replace") for path in logs)
    assert f"fos encoder {EMBED}: openvino fp32 on the cpu" in log
    assert f"fos encoder {EMBED_V3}: onnxruntime fp32 on the cpu" in log
    # One CPU instance each here: all the cores this process may use.
    assert f"fos encoder {EMBED}: openvino fp32 on the cpu (asked for), {available_cores()} threads" in log


def test_cpu_instances_share_the_cores(monkeypatch):
    # Each Triton CPU instance is a process with its own session; GPU instances take none of the CPU's share.
    monkeypatch.setattr(encoder, "available_cores", lambda: 16)
    assert encoder.threads_per_instance([{"kind": "KIND_CPU", "count": 4}]) == 4
    assert encoder.threads_per_instance([{"kind": "KIND_GPU", "count": 2}, {"kind": "KIND_CPU", "count": 3}]) == 5
    assert encoder.threads_per_instance([]) == 16
    monkeypatch.setattr(encoder, "available_cores", lambda: 2)
    assert encoder.threads_per_instance([{"kind": "KIND_CPU", "count": 4}]) == 1  # never none


def test_serve_engine_flag_overrides_and_refuses_what_cannot_serve(exported, monkeypatch, capsys):
    from shim.app import create_app
    from shim.backends.embedded import EmbeddedBackend
    from shim.cli import main

    with ServerThread(create_app(EmbeddedBackend(exported["repository"], engine="onnxruntime"))) as server:
        models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
        assert {m["engine"] for m in models.values()} == {"onnxruntime"}
    # A CPU without bf16 units: openvino-bf16 is refused before anything loads, with the reason.
    monkeypatch.setattr(Cpu, "detect", classmethod(lambda cls: AVX2_CPU))
    repo = str(exported["repository"])
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["serve", "--repository", repo, "--engine", "openvino-bf16", "--port", "1"])
    assert code == 1
    assert "no bf16 units" in capsys.readouterr().err


def test_a_server_on_onnxruntime_streams_answers_each_input_in_its_place(exported, references):
    # A round of inputs of many lengths: cut into runs for 2 streams, computed at once on two sessions, put back in
    # order. The answers are sentence-transformers' as with one stream.
    from shim.app import create_app
    from shim.backends.embedded import EmbeddedBackend

    texts = ["猫", "東京は日本の首都です。", "ラーメンと餃子を食べに行きませんか？" * 3, "春", "新幹線で大阪へ。" * 2, "山"] * 2
    backend = EmbeddedBackend(exported["repository"], engine="onnxruntime", threads=2, streams=2)
    with ServerThread(create_app(backend)) as server:
        assert {m.encoder.streams for m in backend.models.values()} == {2}
        r = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": texts, "encoding_format": "float"})
        got = np.array([d["embedding"] for d in r.json()["data"]])
        runs = backend.models[EMBED].stats.runs
    want = references["embed"].encode(texts, convert_to_numpy=True)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert runs >= 2 and np.max(np.abs(got - want)) <= 1e-4


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino-fp32"])
def test_with_streams_a_second_round_runs_beside_the_first(exported, engine):
    # With streams, the next round's runs take the streams that a round's last runs leave idle. Here each round is one
    # request of one input (one run), and each run waits at a barrier for another: one round at a time, they would
    # never meet. Both rounds compute for 0.5 s at once: the encoder's time counts it once.
    from shim.app import create_app
    from shim.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(exported["repository"], engine=engine, threads=2, streams=2)
    meeting = threading.Barrier(2, timeout=10)
    with ServerThread(create_app(backend)) as server:
        model = backend.models[EMBED]
        assert (model.encoder.rounds_at_once, model.rounds.concurrency) == (2, 2)
        # A lone run takes every thread where no stream runs (test_a_lone_batch_runs_over_every_thread...): here, the
        # streams alone, whose runs must meet.
        model.encoder._wide = None
        for _ in range(2):
            model.encoder._idle.put(Meeting(model.encoder._idle.get(), meeting, set(), sleep=0.5))
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, server.url + "/v1/embeddings", json={"model": EMBED, "input": ["猫"]}, timeout=30)
            while model.rounds.stats.rounds < 1:  # the first round waits at the barrier
                time.sleep(0.01)
            second = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": ["犬"]}, timeout=30)
            assert (first.result().status_code, second.status_code) == (200, 200)
        assert model.rounds.stats.rounds == 2 and 0.5 < model.stats.seconds < time.perf_counter() - began
    one = EmbeddedBackend(exported["repository"], engine=engine, threads=2, streams=1)

    async def rounds_at_once() -> set[tuple[int, int]]:
        await one.start()
        try:
            return {(m.encoder.rounds_at_once, m.rounds.concurrency) for m in one.models.values()}
        finally:
            await one.close()

    assert asyncio.run(rounds_at_once()) == {(1, 1)}  # one stream: one round at a time, as it gathers the most


def test_device_cpu_keeps_encoders_off_a_gpu_and_gpu_needs_cuda(exported, monkeypatch, capsys):
    """On a machine with onnxruntime's CUDA provider, auto puts the encoder on the GPU, where OpenVINO cannot run:
    --device cpu keeps it on the CPU. --device gpu without CUDA is refused before anything loads."""
    from fos_runtime import encoder
    from shim.cli import main

    record = {"onnxruntime": {}, "openvino-fp32": {}}
    model = folder_with(exported["repository"].parent / "device", record) / "model.onnx"
    monkeypatch.setattr(encoder, "cuda_available", lambda: True)
    monkeypatch.setattr(encoder, "gpu_visible", lambda: True)
    monkeypatch.setattr(Cpu, "detect", classmethod(lambda cls: AVX2_CPU))
    with pytest.raises(NotServable, match="--device cpu"):
        encoder.choose_engine(model, "openvino-fp32", "fp32", "auto")
    assert encoder.choose_engine(model, "openvino-fp32", "fp32", "cpu")[0] == Choice("openvino", "fp32")
    assert encoder.choose_engine(model, "auto", "fp32", "auto")[1] == "the encoder is on the GPU"

    monkeypatch.setattr(encoder, "cuda_available", lambda: False)
    repo = str(exported["repository"])
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["serve", "--repository", repo, "--device", "gpu", "--port", "1"])
    assert code == 1
    assert "no CUDA provider" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--device places"):
        main(["serve", "--triton", "127.0.0.1:1", "--device", "cpu", "--port", "1"])


def test_auto_with_onnxruntime_gpu_and_no_gpu_runs_on_the_cpu_set_up_for_it(exported, monkeypatch, caplog):
    """onnxruntime-gpu lists its CUDA provider on any machine (a GPU image started without GPUs): auto must not
    set the encoder up for a GPU, one thread and onnxruntime, and then compute on the CPU."""
    import onnxruntime as ort

    gpu_visible = encoder.gpu_visible
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(Cpu, "detect", classmethod(lambda cls: AVX2_CPU))
    s = next(s for s in read_specs(exported["repository"]) if s.served_name == EMBED)
    model = spec.encoder_file(exported["repository"], s.name)
    for visible in (False, True):  # no GPU's device files; or a GPU whose CUDA does not start (this onnxruntime's)
        monkeypatch.setattr(encoder, "gpu_visible", lambda visible=visible: visible)
        with caplog.at_level("WARNING", logger="fos.encoder"):
            e = Encoder(model, device="auto", engine="auto", precision=s.precision)
        assert (e.device, e.run_threads, e.reason) == ("cpu", available_cores(), "no bf16 units here")
        assert ("CUDA provider did not start" in caplog.text) == visible
        caplog.clear()
    with monkeypatch.context() as m:
        m.setattr(encoder.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
        m.setattr(encoder.sys, "platform", "linux")
        m.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        assert gpu_visible()
        for hidden in ("", " ", "-1", "-1,0"):
            m.setenv("CUDA_VISIBLE_DEVICES", hidden)
            assert not gpu_visible()
        m.setenv("CUDA_VISIBLE_DEVICES", "1")
        assert gpu_visible()
        m.setattr(encoder.glob, "glob", lambda pattern: [])
        assert not gpu_visible()
        m.setattr(encoder.glob, "glob", lambda pattern: ["/dev/dxg"] if pattern == "/dev/dxg" else [])  # WSL 2
        assert gpu_visible()


def test_export_refuses_an_engine_that_could_not_serve_what_it_wrote(tiny_dirs, tmp_path, monkeypatch):
    """An explicit OpenVINO engine for a GPU or non-fp32 export fails before the slow steps; one that parity could not
    pass on this CPU fails the export, rather than every later fos serve and Triton load."""
    from export.main import ExportOptions, ParityError, export

    base = dict(model=str(tiny_dirs["embed"]), task="embed", repository=tmp_path / "repo", encoder_backend="python")
    for wrong in (dict(device="gpu"), dict(precision="int8")):
        with pytest.raises(ValueError, match="OpenVINO serves fp32 exports for the CPU"):
            export(ExportOptions(**base, engine="openvino-bf16", **wrong), log=lambda line: None)
    with pytest.raises(ValueError, match="OpenVINO serves int8 exports for the CPU"):
        export(ExportOptions(**base, engine="openvino-int8"), log=lambda line: None)
    with pytest.raises(ValueError, match="--openvino-int8 goes with --precision int8"):
        export(ExportOptions(**base, openvino_int8=True), log=lambda line: None)
    int8 = dict(base, precision="int8")
    for asked in ("openvino-int8", "openvino"):
        with pytest.raises(ValueError, match=f"--engine {asked} on an int8 export needs --openvino-int8"):
            export(ExportOptions(**int8, engine=asked), log=lambda line: None)
    with pytest.raises(ValueError, match=r"--calibration is for OpenVINO's int8 \(--openvino-int8\)"):
        export(ExportOptions(**int8, calibration=tmp_path / "texts.txt"), log=lambda line: None)
    assert not (tmp_path / "repo").exists()  # nothing was loaded or written
    monkeypatch.setattr(Cpu, "detect", classmethod(lambda cls: AVX2_CPU))
    with pytest.raises(ParityError, match="no bf16 units"):
        export(ExportOptions(**base, engine="openvino-bf16"), log=lambda line: None)
    export(ExportOptions(**base, engine="openvino-fp32"), log=lambda line: None)  # passed here: servable


def test_triton_encoder_names_a_malformed_request_and_serves_the_next(triton, exported):
    """A client calling the encoder model directly (perf_analyzer, another service) with inputs of different shapes
    gets the encoder's own error, not a crash of its stub; a well-formed request still gets the vector it should."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from fos_runtime.tokenization import Encoded

    s = next(s for s in read_specs(exported["repository"]) if s.served_name == EMBED)
    client = grpcclient.InferenceServerClient(triton["grpc"])

    def call(arrays):
        inputs = []
        for name, a in arrays.items():
            tensor = grpcclient.InferInput(name, list(a.shape), "INT64")
            tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        return client.infer(spec.encoder_model(s.name), inputs).as_numpy(spec.EMBEDDING)

    good = padding.pad(Encoded([[2, 40, 41, 3], [2, 50, 3]]), s.pad_token_id, s.encoder_inputs)
    bad = dict(good, attention_mask=good["attention_mask"][:, :3])
    with pytest.raises(InferenceServerException, match="encoder: bad request: the inputs must be 2-D arrays of one shape"):
        call(bad)
    vectors = call(good)
    assert vectors.shape == (2, s.dimension) and np.isfinite(vectors).all()
    alone = call({k: v[1:, :3] for k, v in good.items()})  # the second row alone, unpadded
    assert np.allclose(vectors[1], alone[0], atol=1e-5)


@pytest.mark.parametrize(("engine", "streams"), [("onnxruntime", 1), ("onnxruntime", 2), (Choice("openvino", "fp32"), 1)])
def test_a_long_run_gives_its_memory_back(exported, engine, streams):
    # The CPU engines keep a run's peak for the life of the process: one 4096-token input to this tiny ModernBERT
    # would leave about 800 MB resident with onnxruntime, one of 8192 3.2 GB (OpenVINO: 5 GB). OpenVINO with streams
    # keeps it (engines.OpenVINOSession.run); onnxruntime's streams, a session each, give it back.
    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    _, model = model_of(exported, EMBED_V3)
    enc = Encoder(model, engine=engine, threads=2, streams=streams)
    short = {"input_ids": np.full((8, 64), 5, np.int64), "attention_mask": np.ones((8, 64), np.int64)}
    enc.run_many([short] * streams)
    before = resident_mib()
    long = {"input_ids": np.full((1, 4096), 5, np.int64), "attention_mask": np.ones((1, 4096), np.int64)}
    first = enc.run_many([long] + [short] * (streams - 1))[0]
    assert np.isfinite(first).all()
    # The same shape again, as a client's retry sends it: OpenVINO 2026.4.1 failed that run after a release.
    assert np.array_equal(enc.run_many([long])[0], first)
    enc.run_many([short] * streams)
    assert resident_mib() - before < 200

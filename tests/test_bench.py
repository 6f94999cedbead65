"""``fos bench`` runs against a live server and writes its report."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import corpus as corpora
from bench.report import markdown
from fos_runtime import spec
from shim.cli import main

from helpers import EMBED, RERANK


def test_bench_runs_every_workload(embedded_server, exported, tmp_path):
    tokenizer = exported["repository"] / spec.tokenizer_model(spec.triton_name(EMBED)) / "1" / "tokenizer"
    code = main(
        [
            "bench",
            "--url",
            embedded_server.url,
            "--label",
            "embedded",
            "--model",
            EMBED,
            "--rerank-model",
            RERANK,
            "--workload",
            "dify-embed,batch-embed,rerank",
            "--concurrency",
            "1,2",
            "--duration",
            "1",
            "--max-requests",
            "20",
            "--tokenizer",
            str(tokenizer),
            "--max-length",
            "32",
            "--corpus",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "embedded.json").read_text())
    assert report["corpus"] == "generated"
    levels = report["levels"]
    assert {(r["workload"], r["concurrency"]) for r in levels} == {
        (w, c) for w in ("dify-embed", "batch-embed", "rerank") for c in (1, 2)
    }
    for r in levels:
        assert r["requests"] > 0 and not r["errors"]
        assert r["tokens_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert 0 < r["load_process_cores"] <= 1.05 and isinstance(r["cpu_cores"], dict)  # one thread: one core at most
    assert "| dify-embed | 1 | embedded |" in markdown(levels, baseline="embedded")


def test_bench_refuses_non_loopback(tmp_path):
    with pytest.raises(SystemExit, match="loopback"):
        main(["bench", "--url", "http://10.0.0.1:8081", "--label", "x", "--tokenizer", str(tmp_path)])


def test_generated_corpus_is_japanese():
    c = corpora.generated()
    assert len(c.short) > 100 and len(c.long) > 10
    assert all(0 <= i < len(c.long) for _, i in c.questions)


@pytest.mark.parametrize(("served", "workload"), [(EMBED, "dify-embed"), (RERANK, "rerank")])
def test_engine_alone_forms_the_servers_batches(exported, tmp_path, served, workload):
    import subprocess
    import sys

    args = ["--repository", str(exported["repository"]), "--model", served, "--workload", workload]
    args += ["--round-requests", "2.5", "--seconds", "0.3", "--corpus", str(tmp_path / "absent")]
    r = subprocess.run([sys.executable, "-m", "bench.engine", *args], capture_output=True, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["engine"] == "openvino fp32"  # the model's own engine (conftest.ENGINES), as fos serve runs it
    assert result["rounds"] > 0 and result["tokens_per_s"] > 0
    assert 0 < result["padding_efficiency"] <= 1 and result["rows_per_run"] >= 1


def test_engine_shapes_measures_each_configuration_and_fits_a_run_cost(exported):
    import subprocess
    import sys

    from bench.engine_shapes import fit

    args = ["--repository", str(exported["repository"]), "--model", EMBED, "--configs", "1:1,2:2"]
    args += ["--shapes", "1x8,4x8,4x16", "--seconds", "0.05", "--engine", "openvino-fp32"]
    r = subprocess.run([sys.executable, "-m", "bench.engine_shapes", *args], capture_output=True, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    shapes = [(x["threads"], x["streams"], x["rows"], x["tokens"]) for x in result["results"]]
    assert shapes == [(t, t, rows, width) for t in (1, 2) for rows, width in ((1, 8), (4, 8), (4, 16))]
    assert all(x["tokens_per_s"] > 0 and x["first_round_ms"] > 0 and "first_extra_ms" in x for x in result["results"])
    assert r.stdout.count("run cost") == 2  # a line per configuration and width of two shapes or more: x8
    machine = result["machine"]  # what the figures were measured on, with them
    assert machine["available_cores"] >= 1 and machine["logical_cpus"] >= 1 and "openvino" in machine["versions"]
    assert all(f.startswith(("avx", "amx", "fma", "f16c")) for f in machine["cpu_flags"])
    # A stream count the engine does not run is refused, not reported under a label it did not earn.
    refused = [*args[:4], "--configs", "1:2", "--shapes", "1x8", "--engine", "onnxruntime"]
    r = subprocess.run([sys.executable, "-m", "bench.engine_shapes", *refused], capture_output=True, text=True)
    assert r.returncode != 0 and "runs 1 streams, not 2" in r.stderr
    fixed, per_token = fit([(100, 12.0), (300, 16.0), (500, 20.0)])
    assert (round(fixed, 6), round(per_token, 6)) == (10.0, 0.02)


def test_gemm_ceiling_times_the_products_alone_beside_the_model(exported, tmp_path):
    import subprocess
    import sys

    import onnx

    from bench.gemm_ceiling import macs_per_token, model_depth, stand_in

    assert macs_per_token(1024, 4096, 24) == 301_989_888  # ruri-large's products per token
    assert model_depth(600.0, 4, 24) == 100.0  # 4 stand-in layers a token: a sixth of ruri-large's
    # The stand-in holds the products the ceiling counts, no more and no fewer: its weights are one MAC a token each.
    stand_in(tmp_path / "g.onnx", 16, 40, 3)
    graph = onnx.load(str(tmp_path / "g.onnx")).graph
    weights = {w.name: w.dims for w in graph.initializer}
    products = [n.input[1] for n in graph.node if n.op_type == "MatMul"]
    assert len(products) == 12 and sum(weights[w][0] * weights[w][1] for w in products) == macs_per_token(16, 40, 3)
    # The tiny model's sizes (bench.random_models.TINY); one stand-in layer, so that tokens/s is scaled to its two.
    args = ["--hidden", "32", "--intermediate", "64", "--layers", "2", "--graph-layers", "1", "--shapes", "2x8"]
    args += ["--variants", "onnxruntime-fp32,onnxruntime-int8", "--configs", "1:1,2:2", "--seconds", "0.05"]
    args += ["--alternations", "2", "--repository", str(exported["repository"]), "--model", EMBED]
    r = subprocess.run([sys.executable, "-m", "bench.gemm_ceiling", *args], capture_output=True, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {(x["variant"], x["streams"]): x for x in result["results"]}
    assert set(rows) == {(v, n) for v in ("onnxruntime-fp32", "onnxruntime-int8") for n in (1, 2)}
    for x in rows.values():
        assert len(x["ceiling_tokens_per_s"]) == 2 and min(x["gmacs_per_s"]) > 0
        # A round of streams x 2 x 8 stand-in tokens in ms_per_round[k][0], each half a model token; its MACs a second.
        stand_in_tps = [x["streams"] * 16 * 1000 / ms[0] for ms in x["ms_per_round"]]
        assert x["ceiling_tokens_per_s"] == pytest.approx([t / 2 for t in stand_in_tps])
        assert x["gmacs_per_s"] == pytest.approx([t * macs_per_token(32, 64, 1) / 1e9 for t in stand_in_tps])
    # The export is fp32: its encoder runs beside the fp32 stand-in only.
    assert all(x["share"] > 0 and len(x["model_tokens_per_s"]) == 2 for (v, _), x in rows.items() if v.endswith("fp32"))
    assert not any("share" in x for (v, _), x in rows.items() if v.endswith("int8"))
    assert result["macs_per_token"] == macs_per_token(32, 64, 2) and result["machine"]["available_cores"] >= 1
    # Another size than the export's, or a name it does not serve, is refused, not measured as a meaningless share.
    for bad, said in ((["--hidden", "48"], "hidden size 32"), (["--model", "nobody"], "serves no 'nobody'")):
        r = subprocess.run([sys.executable, "-m", "bench.gemm_ceiling", *args, *bad], capture_output=True, text=True)
        assert r.returncode != 0 and said in r.stderr


def test_op_profile_gives_each_shapes_operator_shares_in_the_session_that_serves(exported):
    import subprocess
    import sys

    args = ["--repository", str(exported["repository"]), "--model", EMBED, "--shapes", "2x8,1x4", "--runs", "3"]
    r = subprocess.run([sys.executable, "-m", "bench.op_profile", *args], capture_output=True, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["engine"] == "onnxruntime fp32" and [(x["rows"], x["tokens"]) for x in result["results"]] == [(2, 8), (1, 4)]
    for x in result["results"]:
        assert x["ms_per_run"] > 0 and abs(sum(x["shares"].values()) - 1) < 1e-6
        # The operators that run: fused attention, and the LayerNormalization the CPU session keeps apart from its Add.
        assert {"Attention", "LayerNormalization", "Add"} <= set(x["shares"]) and "SkipLayerNormalization" not in x["shares"]
    assert result["machine"]["available_cores"] >= 1  # what the figures were measured on, with them


def test_triton_level_reports_rows_queue_and_compute_per_request():
    from bench.loadgen import parse_triton_counts, triton_level

    def reading(rows, execs, requests, queue_us, compute_us):
        labels = 'model="m__encoder",version="1"'
        return parse_triton_counts(
            "# HELP nv_inference_count Number of inferences performed\n"
            f"nv_inference_count{{{labels}}} {rows}\n"
            f"nv_inference_exec_count{{{labels}}} {execs}\n"
            f"nv_inference_request_success{{{labels}}} {requests}\n"
            f"nv_inference_request_failure{{{labels}}} 7\n"
            f"nv_inference_queue_duration_us{{{labels}}} {queue_us}\n"
            f"nv_inference_compute_infer_duration_us{{{labels}}} {compute_us}\n"
        )

    level = triton_level(reading(100, 10, 50, 1_000, 9_000), reading(1_100, 60, 550, 2_001_000, 4_009_000))
    assert level == {
        "m__encoder": {
            "rows": 1000.0,
            "executions": 50.0,
            "rows_per_execution": 20.0,
            "queue_ms_per_request": 4.0,
            "compute_ms_per_request": 8.0,
        }
    }
    # A model that did not run in the interval is left out rather than divided by zero.
    assert triton_level(reading(1, 1, 1, 1, 1), reading(1, 1, 1, 1, 1)) == {}


def test_fake_gpu_repository_serves_on_the_gpu_plan_with_a_sleeping_encoder(exported, tmp_path):
    """bench.fake_gpu: Triton loads the rewritten repository, the shim sees GPU models (their batching plan), and
    the encoder answers with its constant vectors after sleeping, through the real tokenizer and ensemble."""
    from bench import fake_gpu
    from shim.app import create_app
    from shim.backends.triton import TritonBackend

    from helpers import EMBED_V3, ServerThread, run_tritonserver

    repo = tmp_path / "fake"
    assert sorted(fake_gpu.make(exported["repository"], repo, 0.5, 512, 1, {"run_cost_tokens": 750})) == [EMBED, EMBED_V3]
    with (
        run_tritonserver(repo, tmp_path) as triton,
        ServerThread(create_app(backend := TritonBackend(triton["grpc"]))) as server,
    ):
        assert {(s.served_name, s.device, s.max_length) for s in backend.specs()} == {(EMBED, "gpu", 512), (EMBED_V3, "gpu", 512)}
        models = {m["id"]: m for m in json.loads(_get(server.url + "/v1/models"))["data"]}
        assert set(models) == {EMBED, EMBED_V3}
        body = json.dumps({"model": EMBED, "input": ["短い文です。", "もう少し長い文を一つ書きます。"]}).encode()
        out = json.loads(_post(server.url + "/v1/embeddings", body))
    vectors = [d["embedding"] for d in out["data"]]
    assert len(vectors) == 2 and all(abs(sum(v * v for v in vec) - 1) < 1e-5 for vec in vectors)
    assert vectors[0] == vectors[1]  # constant: nothing was computed
    assert out["usage"]["prompt_tokens"] > 4


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _post(url: str, body: bytes) -> str:
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


def test_compare_counts_rounds_of_a_backend_that_had_none_before(monkeypatch, tmp_path):
    """The Triton backend's round counters appear with a model's first request: bench.compare read them as if they
    were there before the first level, and stopped with a KeyError after measuring it."""
    import argparse
    import subprocess

    from bench import compare

    readings = iter([{}, {"fos_rounds_total": 4.0, "fos_round_requests_total": 30.0}])
    monkeypatch.setattr(compare, "_counters", lambda url, model: next(readings))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: None)
    args = argparse.Namespace(
        workloads="dify-embed", dify_levels="16", duration=1, corpus=None, out=tmp_path, embed_name="e", rerank_name="r"
    )
    assert compare._bench("triton-fp32-ort", "http://127.0.0.1:1", tmp_path, args) == {"dify-embed": 7.5}


def test_cpu_usage_finds_each_role_and_its_spawned_workers(tmp_path):
    """bench.cpu_usage on the real /proc: a process whose command line names a role, and its multiprocessing-spawned
    worker (as uvicorn starts ``fos serve --workers``), each charged with the CPU it burned."""
    import subprocess
    import sys
    import textwrap
    import time

    from bench import cpu_usage

    script = tmp_path / "busy.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing, sys, time

            def spin(seconds):
                end = time.process_time() + seconds
                while time.process_time() < end:
                    pass

            def worker(done):
                spin(0.5)
                done.set()
                time.sleep(60)

            if __name__ == "__main__":
                ctx = multiprocessing.get_context("spawn")
                done = ctx.Event()
                child = ctx.Process(target=worker, args=(done,), daemon=True)
                child.start()
                spin(0.5)
                done.wait(30)
                print("ready", flush=True)
                sys.stdin.readline()
                child.terminate()
            """
        )
    )
    before, t0 = cpu_usage.snapshot(), time.perf_counter()
    role = "bench.naive_server"  # on the command line: the role cpu_usage names it by
    proc = subprocess.Popen([sys.executable, str(script), role], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        roles = cpu_usage.usage(before, cpu_usage.snapshot(), time.perf_counter() - t0)
    finally:
        proc.communicate("\n", timeout=30)
    seconds = time.perf_counter() - t0
    for role in ("naive server", "naive server worker"):
        assert roles[role]["processes"] == 1
        assert 0.45 / seconds <= roles[role]["cores"] <= 1.0, roles
    assert "naive server" in cpu_usage.describe(roles)


def test_cpu_usage_names_triton_stubs_by_model_and_ignores_processes_without_a_role():
    from bench import cpu_usage

    stub = ["/x/triton_python_backend_stub", "/repo/m__tokenizer/1/model.py", "shm", "1048576"]
    assert cpu_usage.role_of(stub, "tritonserver") == "triton stub m__tokenizer"
    assert cpu_usage.role_of(["/usr/bin/python3", "-m", "shim.cli", "serve", "--triton", "x"], None) == "fos serve"
    assert cpu_usage.role_of(["python3", "-c", "from multiprocessing.spawn import spawn_main"], "fos serve") == "fos serve worker"
    assert cpu_usage.role_of(["python3", "-c", "from multiprocessing.spawn import spawn_main"], None) is None
    assert cpu_usage.role_of(["bash"], None) is None
    before = {1: cpu_usage.Proc("fos bench", 10.0), 2: cpu_usage.Proc("tritonserver", 5.0)}
    after = {
        1: cpu_usage.Proc("fos bench", 10.5, children=3.0),  # its pool worked 3 s and ended within the interval
        2: cpu_usage.Proc("tritonserver", 6.0),
        3: cpu_usage.Proc("tritonserver", 1.0),
    }
    assert cpu_usage.usage(before, after, 2.0) == {
        "fos bench": {"cores": 1.75, "processes": 1, "busiest": 0.25},  # ended children: in the role, not its busiest
        "tritonserver": {"cores": 1.0, "processes": 2, "busiest": 0.5},
    }


def test_a_level_reads_the_servers_after_its_warm_up():
    """What a level reports of the servers (CPU time, Triton's counters) starts after the two warm-up requests are
    answered: the naive server spends seconds on each, which were counted as the level's before."""
    from fastapi import FastAPI

    from bench.loadgen import Item, run_level

    from helpers import ServerThread

    app = FastAPI()
    answered: list[int] = []

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/v1/embeddings")
    async def embed() -> dict:
        answered.append(1)
        return {}

    items = [Item("/v1/embeddings", {"model": "m", "input": [f"文{i}"]}, 1, 3) for i in range(4)]
    at_start: list[int] = []
    with ServerThread(app) as server:
        level = run_level(server.url, "t", "dify-embed", items, 2, 0.3, 6, on_start=lambda: at_start.append(len(answered)))
    assert at_start == [2]
    assert level.requests == len(answered) - 2 >= 6  # each client checks the bound before its next request


def test_compare_names_embedded_servers_by_variant_streams_and_threads():
    from bench.compare import embedded

    assert embedded("embedded-bf16") == ("fp32", "openvino-bf16", 1, None)
    assert embedded("embedded-bf16-s4-t8") == ("fp32", "openvino-bf16", 4, 8)
    assert embedded("embedded-int8-t2") == ("int8", "onnxruntime", 1, 2)
    assert embedded("embedded-ov-fp32-s2") == ("fp32", "openvino-fp32", 2, None)
    assert embedded("embedded-bf17") is None and embedded("naive") is None and embedded("embedded-bf16-t8-s4") is None


def test_fake_cpu_schedules_the_real_backend_on_sleeping_streams(exported):
    """bench.fake_cpu: the embedded backend's rounds and runs, with encoders that sleep as the AMX host's did; with 4
    streams a rerank round of 10 pairs is cut into a run a stream at least."""
    from bench import fake_cpu

    results = asyncio.run(fake_cpu.run(exported["repository"], [1, 4], list(fake_cpu.CONCURRENCY), 1.5, corpora.generated()))
    assert [(r["streams"], r["workload"]) for r in results] == [(n, w) for n in (1, 4) for w in fake_cpu.CONCURRENCY]
    assert all(r["tokens_per_s"] > 0 and r["p50_ms"] > 0 for r in results)
    rerank = {r["streams"]: r for r in results if r["workload"] == "rerank"}
    assert rerank[4]["runs_per_round"] >= 4 > rerank[1]["runs_per_round"]

"""Run the whole comparison, one server at a time on this machine: the naive sentence-transformers
server, the embedded backend (onnxruntime fp32 and int8, OpenVINO bf16 and f32), the pip tritonserver behind the
shim, and infinity-emb (torch and optimum engines; ``bench/infinity.sh install`` first).

    uv run python -m bench.compare --embed-dir DIR --rerank-dir DIR --repo-fp32 DIR --repo-int8 DIR

Other models than ruri-large and ruri-reranker-large (ruri v3's) take ``--embed-name`` and ``--rerank-name``, the names
they were exported under. The repositories come from ``fos export --encoder-backend python`` (the same files serve both the
embedded backend and the pip tritonserver).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fos_runtime import spec

from .loadgen import prometheus_samples
from .machine import describe, summary

# Triton behind the shim: (ragged batching as exported, rounds in flight per model; None: the plan's). Without ragged
# batching the Python encoder schedules as the container's ONNX Runtime backend does; 4096 rounds in flight is no
# coalescing (every request its own call), the shim as it was before rounds.
TRITON_VARIANTS: dict[str, tuple[bool, int | None]] = {
    "triton-fp32": (True, None),
    "triton-fp32-ort": (False, None),
    "triton-fp32-ort-uncoalesced": (False, 4096),
}
PLAN = {"dify-embed": "1,4,16", "batch-embed": "2", "rerank": "2"}  # concurrency levels
# The embedded backend's variants: (repository, fos serve --engine). bf16 is OpenVINO's on the fp32 export (a CPU with
# AMX or AVX512-BF16); the int8 repository is onnxruntime's dynamic quantization.
EMBEDDED = {
    "fp32": ("fp32", "onnxruntime"),
    "bf16": ("fp32", "openvino-bf16"),
    "ov-fp32": ("fp32", "openvino-fp32"),
    "int8": ("int8", "onnxruntime"),
    "ov-int8": ("int8", "openvino-int8"),  # OpenVINO's own int8 beside it (NNCF)
}


def embedded(server: str) -> tuple[str, str, int, int | None] | None:
    """``embedded-VARIANT[-sN][-tN]`` as (repository, engine, --engine-streams, --threads), else None: e.g.
    ``embedded-bf16-s4-t8`` runs 4 batches of a round at once over 8 threads (a CPU with many cores, where one
    batch at a time over all of them leaves most idle)."""
    m = re.fullmatch(r"embedded-(.+?)(?:-s(\d+))?(?:-t(\d+))?", server)
    if not m or m[1] not in EMBEDDED:
        return None
    return (*EMBEDDED[m[1]], int(m[2] or 1), int(m[3]) if m[3] else None)


def _wait(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(Exception), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(1)
    raise TimeoutError(url)


@contextlib.contextmanager
def _server(cmd: list[str], health: str, log: Path):
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(health, proc)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _without_ragged_batching(repo: Path, copy: Path) -> Path:
    """The repository with its encoders' ragged batching off: the Python encoder then batches only requests of
    equal shape, as the container's ONNX Runtime backend does. Files are hard links, configs rewritten."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(repo, copy, copy_function=os.link)
    for config in copy.glob(f"*{spec.ENCODER_SUFFIX}/config.pbtxt"):
        text = config.read_text().replace("allow_ragged_batch: true", "allow_ragged_batch: false")
        config.unlink()
        config.write_text(text)
    return copy


def _bench(label: str, url: str, tokenizer: Path, args, triton_metrics: str | None = None) -> dict[str, float]:
    """Each workload in turn; returns, per workload, the requests per round the server formed for it (where it
    counts rounds: the embedded backend)."""
    per_round: dict[str, float] = {}
    for workload in args.workloads.split(","):
        model = _model(workload, args)
        before = _counters(url, model)
        levels = _levels(workload, args)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shim.cli",
                "bench",
                "--url",
                url,
                "--label",
                label,
                "--model",
                args.embed_name,
                "--rerank-model",
                args.rerank_name,
                "--workload",
                workload,
                "--concurrency",
                levels,
                "--duration",
                str(args.duration),
                "--tokenizer",
                str(tokenizer),
                "--out",
                str(args.out),
            ]
            + (["--corpus", str(args.corpus)] if args.corpus else [])
            + (["--triton-metrics", triton_metrics] if triton_metrics else []),
            check=True,
        )
        after = _counters(url, model)
        # A backend counts a model's rounds from its first request on: before the first level there may be none.
        rounds, requests = (after.get(k, 0.0) - before.get(k, 0.0) for k in ("fos_rounds_total", "fos_round_requests_total"))
        if rounds:
            per_round[workload] = requests / rounds
    return per_round


def _triton_runs_onnxruntime(repo: Path) -> None:
    """The triton-fp32 rows are onnxruntime fp32: an export left to --engine auto runs OpenVINO bf16 in Triton's
    Python encoder on a CPU with bf16 units."""
    from fos_runtime.encoder import choose_engine
    from shim.repository import read_specs

    for s in read_specs(repo):
        choice, _ = choose_engine(spec.encoder_file(repo, s.name), s.engine, s.precision, "cpu")
        if choice.engine != "onnxruntime":
            raise SystemExit(f"{s.served_name}: Triton would run {choice} here; export --repo-fp32 with --engine onnxruntime")


def _model(workload: str, args) -> str:
    """The served model a workload asks for."""
    return args.rerank_name if workload == "rerank" else args.embed_name


def _levels(workload: str, args) -> str:
    """The concurrency levels a workload runs at, as fos bench --concurrency takes them."""
    return args.dify_levels if workload == "dify-embed" else PLAN[workload]


def _metrics(url: str) -> list[str]:
    """The shim's /metrics, a line each (none where it cannot be read)."""
    with contextlib.suppress(Exception), urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode().splitlines()
    return []


def _counters(url: str, model: str) -> dict[str, float]:
    """The shim's fos_* samples for one model (empty where it cannot be read)."""
    samples = prometheus_samples("\n".join(_metrics(url)))
    return {name: value for name, of, value in samples if name.startswith("fos_") and of == model}


def _engine_alone(
    server: str, repo: Path, engine: str, streams: int, threads: int | None, per_round: dict[str, float], args
) -> None:
    """After the server has stopped: its engine alone (``bench.engine``) on the same requests in rounds of the size
    the server formed, against the end-to-end figure; how much of its engine the server delivers."""
    for workload, round_requests in per_round.items():
        concurrency = int(_levels(workload, args))
        # This run's level: a file of the same --out keeps earlier runs' levels before it.
        level = [
            r
            for r in json.loads((args.out / f"{server}.json").read_text())["levels"]
            if (r["workload"], r["concurrency"]) == (workload, concurrency)
        ][-1]
        cmd = [sys.executable, "-m", "bench.engine", "--repository", str(repo), "--workload", workload]
        cmd += ["--model", _model(workload, args), "--engine", engine, "--device", args.device]
        cmd += ["--seconds", str(args.engine_seconds), "--streams", str(streams)]
        cmd += ["--threads", str(threads)] if threads else []
        cmd += ["--round-requests", f"{round_requests:.3f}", "--requests", str(level["requests"])]
        cmd += ["--corpus", str(args.corpus)] if args.corpus else []
        raw = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        raw["end_to_end_tokens_per_s"] = level["tokens_per_s"]
        raw["share_of_engine"] = level["tokens_per_s"] / raw["tokens_per_s"]
        (args.out / f"{server}-{workload}-engine.json").write_text(json.dumps(raw, indent=1) + "\n")
        print(
            f"{server:>24} {workload:>12}: end to end {level['tokens_per_s']:.0f} tokens/s, its engine alone at the "
            f"server's rounds ({round_requests:.1f} requests) {raw['tokens_per_s']:.0f}: {raw['share_of_engine']:.2f}",
            flush=True,
        )


def _save_metrics(label: str, url: str, out: Path) -> None:
    """The shim's own counters after the run (padding efficiency, batches), beside the JSON."""
    lines = _metrics(url)
    if lines:
        wanted = ("fos_padding", "fos_round", "fos_encoder", "fos_tokens", "fos_engine")
        kept = [line for line in lines if line.startswith(wanted)]
        (out / f"{label}-metrics.txt").write_text("\n".join(kept) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embed-dir", type=Path, required=True, help="sentence-transformers directory")
    p.add_argument("--rerank-dir", type=Path, required=True, help="cross-encoder directory")
    p.add_argument("--embed-name", default="cl-nagoya/ruri-large", help="the embedder's served name in the repositories")
    p.add_argument("--rerank-name", default="cl-nagoya/ruri-reranker-large", help="the reranker's served name")
    p.add_argument("--repo-fp32", type=Path, required=True)
    p.add_argument("--repo-int8", type=Path)
    p.add_argument("--servers", default="naive,embedded-fp32,embedded-bf16,embedded-int8,triton-fp32")
    p.add_argument("--workloads", default="dify-embed,batch-embed,rerank")
    p.add_argument("--dify-levels", default=PLAN["dify-embed"], help="dify-embed concurrency levels")
    p.add_argument("--duration", type=float, default=40)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument(
        "--engine-alone",
        action="store_true",
        help="after each embedded server, its engine alone at the batch shapes it formed (bench.engine): "
        "SERVER-WORKLOAD-engine.json with the end-to-end share",
    )
    p.add_argument("--engine-seconds", type=float, default=30, help="how long --engine-alone runs each")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("auto", "cpu"),
        help="the embedded servers' fos serve --device; cpu, as the naive server computes on the CPU",
    )
    args = p.parse_args()
    if args.engine_alone and any("," in _levels(w, args) for w in args.workloads.split(",")):
        # The server's round sizes are read over a whole fos bench run: one level, or they mix.
        raise SystemExit("--engine-alone needs one concurrency level per workload (--dify-levels 16)")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe()
    (args.out / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")
    print(f"machine: {summary(machine)}", flush=True)
    log = args.out / "servers.log"
    port = 8091
    url = f"http://127.0.0.1:{port}"
    tokenizer = spec.tokenizer_files(args.repo_fp32, spec.triton_name(args.embed_name))
    fos = [sys.executable, "-m", "shim.cli"]
    for server in args.servers.split(","):
        print(f"== {server}", flush=True)
        if server == "naive":
            cmd = [
                sys.executable,
                "-m",
                "bench.naive_server",
                "--embed",
                str(args.embed_dir),
                "--rerank",
                str(args.rerank_dir),
                "--embed-name",
                args.embed_name,
                "--rerank-name",
                args.rerank_name,
                "--port",
                str(port),
            ]
            with _server(cmd, url + "/health", log):
                _bench(server, url, tokenizer, args)
        elif (variant := embedded(server)) is not None:
            exported, engine, streams, threads = variant
            repo = args.repo_fp32 if exported == "fp32" else args.repo_int8
            serve = [*fos, "serve", "--repository", str(repo), "--port", str(port), "--log-level", "warning"]
            serve += ["--engine", engine, "--device", args.device, "--engine-streams", str(streams)]
            serve += ["--threads", str(threads)] if threads else []
            with _server(serve, url + "/health", log):
                per_round = _bench(server, url, tokenizer, args)
                _save_metrics(server, url, args.out)
            if args.engine_alone:
                _engine_alone(server, repo, engine, streams, threads, per_round, args)
        elif server in TRITON_VARIANTS:
            _triton_runs_onnxruntime(args.repo_fp32)
            ragged, rounds = TRITON_VARIANTS[server]
            repo = args.repo_fp32 if ragged else _without_ragged_batching(args.repo_fp32, args.out / "repo-no-ragged")
            triton = [*fos, "triton", "--repository", str(repo), "--http-port", "18000", "--grpc-port", "18001"]
            shim = [*fos, "serve", "--triton", "127.0.0.1:18001", "--port", str(port), "--log-level", "warning"]
            shim += ["--triton-rounds-in-flight", str(rounds)] if rounds else []
            with (
                _server([*triton, "--metrics-port", "18002"], "http://127.0.0.1:18000/v2/health/ready", log),
                _server(shim, url + "/health", log),
            ):
                _bench(server, url, tokenizer, args, triton_metrics="http://127.0.0.1:18002/metrics")
                _save_metrics(server, url, args.out)
        elif server.startswith("infinity-"):
            engine = server.removeprefix("infinity-")
            script = Path(__file__).resolve().parent / "infinity.sh"
            cmd = ["bash", str(script), "serve", engine, str(args.embed_dir), str(args.rerank_dir), str(port)]
            with _server(cmd, url + "/health", log):
                _bench(server, url, tokenizer, args)
        else:
            raise SystemExit(f"unknown server {server!r}")


if __name__ == "__main__":
    main()

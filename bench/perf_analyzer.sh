#!/usr/bin/env bash
# Triton's perf_analyzer against every exported ensemble, straight over gRPC: tells Triton's own cost
# apart from the shim's. Installs it on first use into .tools/perf_analyzer (not the shim's env):
# the perf_analyzer binary inside the tritonclient 2.41.0 wheel, with libcudart.so.12 from PyPI and
# Debian's libb64-0d (the current perf-analyzer wheel needs glibc >= 2.38).
#
#   bench/perf_analyzer.sh REPOSITORY [HOST:GRPC_PORT] [CONCURRENCY_RANGE]   e.g. model_repository 127.0.0.1:8001 1:9:4
#   bench/perf_analyzer.sh --install                                         only install
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/perf_analyzer"
if [ ! -x "$venv/bin/perf_analyzer" ]; then
  echo "installing perf_analyzer into $venv" >&2
  uv venv -q --python python3.11 "$venv"
  uv pip install -q --python "$venv/bin/python" "tritonclient==2.41.0" nvidia-cuda-runtime-cu12
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq libb64-0d >/dev/null; else echo "install Debian's libb64-0d first" >&2; exit 1; fi
fi
cudart=$(echo "$venv"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
export LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ "${1:-}" = "--install" ] && { "$venv/bin/perf_analyzer" --version 2>/dev/null || true; exit 0; }

repo=${1:?usage: bench/perf_analyzer.sh REPOSITORY [HOST:GRPC_PORT] [CONCURRENCY_RANGE]}
url=${2:-127.0.0.1:8001}
range=${3:-1:9:4}
out=${PA_OUT:-bench-results}
mkdir -p "$out"
for input in "$repo"/*/perf_analyzer_input.json; do
  model=$(basename "$(dirname "$input")")
  echo "== $model (concurrency $range)"
  "$venv/bin/perf_analyzer" -m "$model" -u "$url" -i grpc --input-data "$input" \
    --concurrency-range "$range" --measurement-interval "${PA_INTERVAL_MS:-10000}" --percentile 99 \
    --stability-percentage "${PA_STABILITY:-50}" --max-trials "${PA_TRIALS:-5}" \
    -f "$out/perf_analyzer-$model.csv" || echo "perf_analyzer: $model did not stabilise" >&2
done

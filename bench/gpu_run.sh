#!/usr/bin/env bash
# The GPU production path end to end, in one run on a GPU machine, against the naive server on the same GPU.
#
#   bash bench/gpu_bundle.sh pack                          # here, once: what the GPU machine lacks, in pieces
#   bash bench/gpu_bundle.sh unpack .carry                 # there, one call per piece (each ≤ 58 MiB)
#   OUT=/some/dir bash bench/gpu_run.sh                    # there, last: about eight minutes
#   (measured on the H100 at FOS_DURATION=12 with FOS_STEPS=cpuprep,encoder,triton,naive: 9.0 minutes with the
#   defaults, 8.8 with a sweep of four levels and one encoder count; each level ~30 s, a second encoder count ~1.5 min)
#
# Steps: a random model of cl-nagoya/ruri-large's exact shape (BertModel 24×1024, MeCab + WordPiece vocabulary
# from JGLUE), `fos export --device gpu --precision fp16 --encoder-backend python`, the encoder alone against
# sentence-transformers fp16 (bench/gpu.py), then the served path: the pip tritonserver (tokenizer instances on
# the CPU, the fp16 encoder on the GPU through onnxruntime CUDA), `fos serve --triton --workers`, and `fos bench`
# with several load processes, Triton's rows per encoder execution and nvidia-smi's utilisation; last, the naive
# sentence-transformers server in fp16 on the same GPU at the same concurrency. Results and logs: one archive,
# $OUT/gpu-results.tar.gz (the device tool brings back at most eight files), written even when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-/tmp/fos-gpu-out}
WORK=${FOS_GPU_WORK:-/tmp/fos-gpu}
OUT=$WORK/results
CORPUS=${FOS_CORPUS:-.carry/jglue}               # JGLUE's jsts/jsquad validation files, carried beside the bundle
DURATION=${FOS_DURATION:-20}                     # seconds per measured level
DIFY_C=${FOS_DIFY_C:-256}                        # dify-embed concurrency
BATCH_C=${FOS_BATCH_C:-32}                       # batch-embed concurrency
WORKERS=${FOS_WORKERS:-8}                        # fos serve processes (4 capped the H100 run at ~4,800 requests/s)
TOKENIZERS=${FOS_TOKENIZERS:-6}                  # Triton tokenizer instances
ENCODERS=${FOS_ENCODERS:-1 2}                    # Triton encoder instances on the GPU; each after the first: its own levels
LOADGEN=${FOS_LOADGEN:-4}                        # fos bench processes
STEPS=${FOS_STEPS:-encoder,triton,naive}         # which measurements to run; cpu: the host's CPU engines (below)
step() { [[ ",$STEPS," == *",$1,"* ]]; }
# cpuprep step: cores of its own (10-15 of 16) beside a GPU step; every core in a call without one.
if step encoder || step triton; then PREP_DEFAULT=$(( $(nproc) * 5 / 8 ))-$(( $(nproc) - 1 )); else PREP_DEFAULT=0-$(( $(nproc) - 1 )); fi
PREP_CORES=${FOS_PREP_CORES:-$PREP_DEFAULT}
SWEEP=${FOS_SWEEP-8:8}                           # shim workers:rounds in flight per worker, each a dify-embed level ("": none)
CPU_CORES=${FOS_CPU_CORES:-}                     # cpu step: taskset's core list (e.g. 0-1); empty: every core
# cpu step: embedded-bf16-s4 runs 4 batches of a round at once (fos serve --engine-streams 4): the fourth run's 16 cores
# ran batches of 3-5 rows one at a time; embedded-int8-s4 does the same with onnxruntime's int8 (a session a stream).
# Names: bench/compare.py (embedded-bf16-s4-t8: 4 streams over 8 threads).
# Add embedded-fp32 where there is time (~1 min more). embedded-int8 (onnxruntime's int8) and embedded-ov-int8
# (OpenVINO's, NNCF) make cpuprep export int8 too, with --openvino-int8 for the latter (NNCF: 2.4 min a model on 2 Zen 4
# cores).
CPU_SERVERS=${FOS_CPU_SERVERS:-naive,embedded-bf16,embedded-bf16-s4}
CPU_WORKLOADS=${FOS_CPU_WORKLOADS:-dify-embed,batch-embed,rerank}
CPU_DURATION=${FOS_CPU_DURATION:-$DURATION}      # cpu step: seconds per level
# cpu step: engines (fos serve --engine names, and onnxruntime-int8 for onnxruntime on the int8 export) whose speed on uniform shapes (bench.engine_shapes, every core, the
# reranker) is measured after the servers: the ceiling their served figures are read against. "": none.
CPU_SHAPES=${FOS_CPU_SHAPES:-}
# cpu step: bench.engine_shapes's threads:streams for those engines (0: every core); e.g. 0:1,0:4 measures 4 batches at
# once (fos serve --engine-streams 4) beside one.
CPU_CONFIGS=${FOS_CPU_CONFIGS:-0:1}
CPU_ENGINE_ALONE=${FOS_CPU_ENGINE_ALONE:-}       # cpu step: 1 adds each server's engine alone (~1 min a server)
export FOS_ENCODER_TIMING=${FOS_ENCODER_TIMING:-200}  # Triton's encoder logs where its time goes
NAME=cl-nagoya/ruri-large
# To try the script out on a CPU: FOS_DEVICE=cpu FOS_PRECISION=fp32 FOS_SIZE=tiny FOS_DURATION=3 (no GPU figures).
# The host's CPU alone, without the GPU pieces (bench/gpu_bundle.sh pack-cpu): bench/device_cpu.sh runs FOS_STEPS=cpu
# detached across calls (docs/benchmarks.md, Reproduce). On the H100's host (16 vCPUs) its models and exports took 8.2
# minutes one after the other (they now run at once there), each served engine about 90 s at FOS_CPU_DURATION=8.
# After a GPU call, FOS_STEPS=cpu must follow at once: the machine, and all it was given, goes back after 30 s idle.
DEVICE=${FOS_DEVICE:-gpu}
PRECISION=${FOS_PRECISION:-fp16}
SIZE=${FOS_SIZE:-full}
mkdir -p "$OUT" "$DEST"
# What bench/gpu_bundle.sh brought (none of it where the machine has it all, e.g. this project's own venv).
[ -d "${FOS_SITE:-/tmp/fos-site}" ] && eval "$(bash bench/gpu_bundle.sh env)"
EXTRA=${FOS_TOOLS:-/tmp/fos-tools}/extra  # numpy 1.26 for Triton's Python stub (FOS_EXTRA=numpy==1.26.4 at pack)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${FOS_PYTHON:-python3}
log() {  # a step begins: say so, and keep the archive current in case the run is cut short
  echo "[$(date +%T)] $*"
  tar czf "$DEST/gpu-results.tar.gz" -C "$OUT" . 2>/dev/null || true
}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
finish() { cleanup; tar czf "$DEST/gpu-results.tar.gz" -C "$OUT" .; }
trap finish EXIT
wait_http() {  # url seconds: the server last started must answer, and must not have exited meanwhile
  for _ in $(seq 1 "$2"); do curl -fs -o /dev/null "$1" && return 0; kill -0 "${pids[-1]}" 2>/dev/null || break; sleep 1; done
  echo "not ready: $1"; return 1
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; lscpu | grep -E 'Model name|^CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|NUMA node\(s\)';
  grep -o -w -E 'avx512_bf16|amx_tile|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; } > "$OUT/machine.txt" 2>&1 || true
cat "$OUT/machine.txt"

log "model: ruri-large shape, random weights"
[ -d "$WORK/model/st" ] || $PY -m bench.ruri_shape "$WORK/model" --corpus "$CORPUS" --size "$SIZE" > "$OUT/build.log" 2>&1

wants() { [[ ",$CPU_SERVERS," =~ ,$1(-s[0-9]+)?(-t[0-9]+)?, ]]; }  # a server of bench/compare.py's names, any streams/threads
export_cpu() {  # [flags...]: one of cpu_prep's exports (its src, task, name, repo, precision)
  $PY -m shim.cli export --model "$src" --task $task --name "$name" \
    --repository "$repo" --precision $precision --device cpu --encoder-backend python "$@" \
    >> "$OUT/export-cpu-$precision-$task.log" 2>&1 || { echo "export $precision $task $* failed: $OUT/export-cpu-$precision-$task.log"
      rm -rf "$repo/${name/\//--}" "$repo/${name/\//--}__"*; return 1; }
}
# The four exports at once where there are cores for them: one after the other they took 8.2 minutes of the 16-core
# host's 13 (each is mostly one thread: loading, tracing, NNCF's statistics); they write different models or
# repositories, and each stages its own files. nproc counts the cores cpuprep is pinned to, where it is.
cpu_prep() {  # the cpu step's models and exports (each export checks parity on every CPU engine)
  local parallel=${FOS_PREP_PARALLEL:-$([ "$(nproc)" -ge 8 ] && echo 1 || echo 0)}
  [ -d "$WORK/rerank/hf" ] || $PY -m bench.ruri_shape "$WORK/rerank" --reranker --corpus "$CORPUS" --size "$SIZE" \
    > "$OUT/build-rerank.log" 2>&1
  local task src name precision repo flags logs=() jobs=()
  for precision in fp32 int8; do
    repo=$WORK/repo-cpu flags=()
    if [ $precision = int8 ]; then
      wants embedded-int8 || wants embedded-ov-int8 || continue
      repo=$WORK/repo-cpu-int8
      if wants embedded-ov-int8; then flags=(--openvino-int8); fi
    fi
    for task in embed rerank; do
      if [ $task = embed ]; then src=$WORK/model/st name=$NAME; else src=$WORK/rerank/hf name=cl-nagoya/ruri-reranker-large; fi
      # Done once parity has recorded its engines (export writes the configs before NNCF and parity run).
      local done=$repo/${name/\//--}__encoder/1/engines.json
      if [ -f "$done" ] && { [ ${#flags[@]} -eq 0 ] || grep -q openvino-int8 "$done"; }; then continue; fi
      : > "$OUT/export-cpu-$precision-$task.log"
      logs+=("$OUT/export-cpu-$precision-$task.log")
      # NNCF is the likeliest to fail on a machine's own packages (nncf 3.4 asks for numpy < 2.5): onnxruntime's int8
      # is still measured without it.
      if [ "$parallel" = 1 ]; then
        { export_cpu "${flags[@]}" || { [ ${#flags[@]} -gt 0 ] && export_cpu; } || true; } &
        jobs+=($!)
      else
        export_cpu "${flags[@]}" || { [ ${#flags[@]} -gt 0 ] && export_cpu; } || true
      fi
    done
  done
  if [ ${#jobs[@]} -gt 0 ]; then wait "${jobs[@]}" || true; fi
  for f in "${logs[@]}"; do echo "$(basename "$f"):"; grep -E 'parity|min cosine|check|engines that|NNCF|not fused' "$f" || true; done
}
# cpuprep: the cpu step's preparation, on cores of its own while the GPU export and the encoder alone run (the GPU is
# what those measure), so that the cpu step's own call is only measurements. Finished before the served path starts.
prep=
if step cpuprep; then
  log "cpu step's models and exports, in the background on cores $PREP_CORES"
  (taskset -p -c "$PREP_CORES" $BASHPID > /dev/null 2>&1 || echo "taskset $PREP_CORES failed: every core" > "$OUT/cpuprep.log"
   rc=0; cpu_prep >> "$OUT/cpuprep.log" 2>&1 || rc=$?; echo "cpuprep exit $rc" >> "$OUT/cpuprep.log") &
  prep=$!
  # The GPU steps meanwhile on the other cores: the encoder alone is a figure of its own.
  MAIN_CORES=0-$(( ${PREP_CORES%-*} - 1 ))
fi
pin() { if [ -n "$prep" ] && [ "${PREP_CORES%-*}" -gt 0 ] 2>/dev/null; then taskset -c "$MAIN_CORES" "$@"; else "$@"; fi; }
if step encoder || step triton; then
log "export: $PRECISION, $DEVICE, Python-backend encoder, $TOKENIZERS tokenizer instances"
[ -f "$WORK/repo/${NAME/\//--}/config.pbtxt" ] || pin $PY -m shim.cli export --model "$WORK/model/st" --task embed --name "$NAME" \
  --repository "$WORK/repo" --precision "$PRECISION" --device "$DEVICE" --encoder-backend python \
  --tokenizer-instances "$TOKENIZERS" --encoder-instances "${ENCODERS%% *}" > "$OUT/export.log" 2>&1
grep -E 'fused|parity|max \||min cosine|check' "$OUT/export.log" || true
fi

if step encoder; then
log "encoder alone and sentence-transformers fp16"
pin $PY -m bench.gpu --repository "$WORK/repo" --name "$NAME" --st "$WORK/model/st" --corpus "$CORPUS" --out "$OUT" \
  --device "$DEVICE" > "$OUT/encoder.log" 2>&1 || { tail -20 "$OUT/encoder.log"; exit 1; }
grep -E 'tokens/s' "$OUT/encoder.log"
fi

# Tokens are counted with the model's own tokenizer (the export's copy of it where there is one), for every server.
TOK=$WORK/model/st
[ -d "$WORK/repo/${NAME/\//--}__tokenizer/1/tokenizer" ] && TOK="$WORK/repo/${NAME/\//--}__tokenizer/1/tokenizer"
bench() {  # label workload concurrency [extra...]
  $PY -m shim.cli bench --url http://127.0.0.1:8081 --label "$1" --model "$NAME" --workload "$2" --concurrency "$3" \
    --duration "$DURATION" --max-requests 10000000 --tokenizer "$TOK" --corpus "$CORPUS" --out "$OUT" \
    --processes "$LOADGEN" "${@:4}"
}

if [ -n "$prep" ]; then log "waiting for the cpu step's exports"; wait "$prep" || true; prep=; tail -3 "$OUT/cpuprep.log" || true; fi

if step triton; then
log "tritonserver (${ENCODERS%% *} encoder instances) + fos serve --workers $WORKERS"
ENCODER_CONFIG="$WORK/repo/${NAME/\//--}__encoder/config.pbtxt"
encoders() {  # the encoder's instance count in the repository (an earlier run on this machine may have changed it)
  sed -i -E "s/^(  count: )[0-9]+$/\1$1/" "$ENCODER_CONFIG"
  grep -q "^  count: $1$" "$ENCODER_CONFIG" || { echo "could not set $1 encoder instances in $ENCODER_CONFIG"; exit 1; }
}
encoders "${ENCODERS%% *}"
rm -f "$OUT"/fos-triton*.json  # from an earlier run on this machine: the best-of-sweep pick and the summary read these
: > "$OUT/triton.log"; : > "$OUT/serve.log"  # each start below appends
start_triton() {
  PYTHONPATH="$([ -d "$EXTRA" ] && echo "$EXTRA:")$PYTHONPATH" \
    $PY -m shim.cli triton --repository "$WORK/repo" --http-port 8000 --grpc-port 8001 --metrics-port 8002 >> "$OUT/triton.log" 2>&1 &
  triton=$!
  pids+=($triton)
  wait_http http://127.0.0.1:8000/v2/health/ready 300 || { tail -40 "$OUT/triton.log"; exit 1; }
}
start_shim() {  # workers [rounds; default: the plan's], in place of the shim running now if any
  [ -z "${serve:-}" ] || { kill "$serve" 2>/dev/null || true; wait "$serve" 2>/dev/null || true; }
  $PY -m shim.cli serve --triton 127.0.0.1:8001 --port 8081 --workers "$1" ${2:+--triton-rounds-in-flight "$2"} \
    --log-level warning >> "$OUT/serve.log" 2>&1 &
  serve=$!
  pids+=($serve)
  wait_http http://127.0.0.1:8081/health 120 || { tail -40 "$OUT/serve.log"; exit 1; }
}
start_triton
start_shim "$WORKERS"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/gpu-util.csv" 2>/dev/null &
smi=$!
pids+=($smi)
fos_bench() { bench "$@" --triton-metrics http://127.0.0.1:8002/metrics; }  # label workload concurrency
log "fos (Triton) dify-embed c=$DIFY_C, batch-embed c=$BATCH_C"
fos_bench fos-triton dify-embed "$DIFY_C"
fos_bench fos-triton batch-embed "$BATCH_C"
curl -fsS http://127.0.0.1:8081/metrics > "$OUT/fos-metrics.txt" || true
grep "fos encoder" "$OUT/triton.log" | tail -3 || true
# The first H100 run with shape buckets found the encoder ~75% busy at dify-embed c=256 and ~21 rows per execution:
# the same level with more shim workers and more rounds in flight per worker (FOS_SWEEP, workers:rounds), each
# level's CPU use per process role beside it; then batch-embed again on the one that answered most tokens/s.
for wr in $SWEEP; do
  [[ $wr =~ ^[0-9]+:[0-9]+$ ]] || { echo "FOS_SWEEP wants workers:rounds entries, not $wr"; exit 1; }
  log "fos (Triton) dify-embed c=$DIFY_C, ${wr%:*} shim workers, ${wr#*:} rounds in flight per worker"
  start_shim "${wr%:*}" "${wr#*:}"
  fos_bench "fos-triton-w${wr%:*}r${wr#*:}" dify-embed "$DIFY_C"
done
best=$($PY -c 'import json, pathlib, sys
runs = [(json.loads(f.read_text())["levels"][-1]["tokens_per_s"], f.stem) for f in pathlib.Path(sys.argv[1]).glob("fos-triton-w*.json")]
print(max(runs)[1].removeprefix("fos-triton-") if runs else "")' "$OUT")  # the step began with no fos-triton*.json
if [ -n "$best" ]; then
  w=${best#w}; w=${w%r*}; r=${best#*r}
  log "fos (Triton) batch-embed c=$BATCH_C on the best of the sweep: $w shim workers, $r rounds in flight"
  start_shim "$w" "$r"
  fos_bench "fos-triton-$best" batch-embed "$BATCH_C"
fi
# The same H100 run found the GPU busy ~25% of the time while its one encoder instance was busy ~95%: the instance's
# host process (padding, kernel launches) is the bottleneck. More instances, each its own process and session.
for n in ${ENCODERS#"${ENCODERS%% *}"}; do
  log "fos (Triton) with $n encoder instances on the GPU: dify-embed c=$DIFY_C, batch-embed c=$BATCH_C"
  kill "$serve" "$triton" 2>/dev/null || true; wait "$serve" "$triton" 2>/dev/null || true
  serve=
  encoders "$n"
  start_triton
  start_shim "$WORKERS"
  fos_bench "fos-triton-e$n" dify-embed "$DIFY_C"
  fos_bench "fos-triton-e$n" batch-embed "$BATCH_C"
done
kill "$smi" 2>/dev/null || true
curl -fsS http://127.0.0.1:8002/metrics > "$OUT/triton-metrics.txt" || true
cleanup
pids=()
fi

if step naive; then
log "naive sentence-transformers server, fp16 on the same GPU"
$PY -m bench.naive_server --embed "$WORK/model/st" --device "$([ "$DEVICE" = gpu ] && echo cuda || echo cpu)" --port 8081 > "$OUT/naive.log" 2>&1 &
pids+=($!)
wait_http http://127.0.0.1:8081/health 300 || { tail -40 "$OUT/naive.log"; exit 1; }
bench naive-fp16 dify-embed "$DIFY_C"
fi
if step cpu; then
# The host's CPUs (AMX on the GPU machine): the naive server against the embedded backend on the engines of
# FOS_CPU_SERVERS (with FOS_CPU_ENGINE_ALONE, each server's engine alone at the rounds it formed); every encoder kept on
# the CPU.
log "CPU engines: $CPU_SERVERS; $CPU_WORKLOADS${CPU_CORES:+; cores $CPU_CORES}"
cpu_prep
int8=()
if [ -d "$WORK/repo-cpu-int8" ]; then int8=(--repo-int8 "$WORK/repo-cpu-int8"); fi
# A server whose export failed (NNCF's, most likely) is left out, not allowed to stop the others' measurement.
servers=()
for s in ${CPU_SERVERS//,/ }; do
  need=
  case $s in embedded-ov-int8*) need=openvino-int8 ;; embedded-int8*) need=onnxruntime ;; esac
  for r in "$WORK"/repo-cpu-int8/*__encoder/1/engines.json; do
    if [ -n "$need" ] && ! grep -q "\"$need\"" "$r" 2>/dev/null; then echo "$s left out: no $need in $r"; continue 2; fi
  done
  servers+=("$s")
done
CPU_SERVERS=$(IFS=,; echo "${servers[*]}")
${CPU_CORES:+taskset -c "$CPU_CORES"} $PY -m bench.compare --embed-dir "$WORK/model/st" --rerank-dir "$WORK/rerank/hf" \
  --repo-fp32 "$WORK/repo-cpu" "${int8[@]}" --servers "$CPU_SERVERS" --workloads "$CPU_WORKLOADS" \
  --dify-levels 16 --duration "$CPU_DURATION" ${CPU_ENGINE_ALONE:+--engine-alone --engine-seconds "$CPU_DURATION"} \
  --device cpu --corpus "$CORPUS" --out "$OUT/cpu" > "$OUT/cpu.log" 2>&1 || { tail -30 "$OUT/cpu.log"; exit 1; }
grep -E 'c=|engine alone' "$OUT/cpu.log"
for engine in ${CPU_SHAPES//,/ }; do
  log "uniform shapes: $engine"
  repo=$WORK/repo-cpu
  arg=$engine
  case $engine in openvino-int8) repo=$WORK/repo-cpu-int8 ;; onnxruntime-int8) repo=$WORK/repo-cpu-int8 arg=onnxruntime ;; esac
  ${CPU_CORES:+taskset -c "$CPU_CORES"} $PY -m bench.engine_shapes --repository "$repo" --model cl-nagoya/ruri-reranker-large \
    --engine "$arg" --configs "$CPU_CONFIGS" --seconds 1.5 \
    --shapes 1x32,4x32,16x32,1x64,1x65,1x128,2x65,4x33,4x48,4x49,4x128,16x128,2x120,3x100 \
    > "$OUT/cpu/shapes-$engine.log" 2>&1 || echo "engine_shapes $engine failed"
  grep -E '^threads' "$OUT/cpu/shapes-$engine.log" || true
done
fi
log "done: $OUT"

# The figures the issue asks for, on stdout (the device tool returns its tail).
$PY - "$OUT" <<'PY'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
levels = {}
for f in sorted(out.glob("fos-triton*.json")) + [out / "naive-fp16.json"]:
    if f.exists():
        for lv in json.loads(f.read_text())["levels"]:
            levels[(lv["label"], lv["workload"])] = lv
            enc = {m: v["rows_per_execution"] for m, v in lv.get("triton", {}).items() if m.endswith("__encoder")}
            print(f"{lv['label']:>12} {lv['workload']:>12} c={lv['concurrency']:<4} {lv['tokens_per_s']:>10,.0f} tokens/s "
                  f"{lv['requests_per_s']:>8,.0f} req/s  p50 {lv['p50_ms']:.1f} p95 {lv['p95_ms']:.1f} p99 {lv['p99_ms']:.1f} ms "
                  f"errors {lv['errors'] or 0}  rows/encoder execution {enc}")
            cores = lv.get("cpu_cores", {})
            if cores:
                print(" " * 14 + "CPU cores: " + ", ".join(f"{r} {u['cores']:.2f} (busiest {u['busiest']:.2f})" for r, u in cores.items())
                      + f"; busiest load process {lv.get('load_process_cores', 0):.2f}")
enc = json.loads((out / "encoder.json").read_text()) if (out / "encoder.json").exists() else {}
if enc:
    print("encoder alone", round(enc["encoder_alone"]["tokens_per_s"]), "tokens/s; sentence-transformers fp16 bs32",
          round(enc.get("st_fp16_bs32", {}).get("tokens_per_s", 0)), enc.get("min_cosine_vs_st_fp32"))
cpu = {}
for f in (out / "cpu").glob("*.json") if (out / "cpu").is_dir() else ():
    if not f.name.endswith("-engine.json"):  # machine.json and the engines alone have no levels
        for lv in json.loads(f.read_text()).get("levels", []):
            cpu[(lv["label"], lv["workload"])] = lv["tokens_per_s"]
for (label, workload), tps in sorted(cpu.items()):
    if label != "naive" and cpu.get(("naive", workload)):
        print(f"CPU {workload:>12} {label:>14}: {tps:,.0f} tokens/s, {tps / cpu[('naive', workload)]:.2f}x the naive server")
naive = levels.get(("naive-fp16", "dify-embed"))
for (label, workload), fos in levels.items():
    if label.startswith("fos-triton") and workload == "dify-embed" and naive:
        print(f"dify-embed {label} / naive: {fos['tokens_per_s'] / naive['tokens_per_s']:.1f}x; "
              f"p99/p50 {fos['p99_ms'] / fos['p50_ms']:.2f}")
for (label, workload), batch in levels.items():
    if workload == "batch-embed" and label.startswith("fos-triton") and enc:
        print(f"batch-embed {label} / encoder alone: {batch['tokens_per_s'] / enc['encoder_alone']['tokens_per_s']:.2f}")
util = [float(r.split(",")[1].split()[0]) for r in (out / "gpu-util.csv").read_text().splitlines() if r.count(",") >= 2] if (out / "gpu-util.csv").exists() else []
if util:
    print(f"GPU utilisation while fos was measured: mean {sum(util) / len(util):.0f}%, max {max(util):.0f}% ({len(util)} samples)")
PY

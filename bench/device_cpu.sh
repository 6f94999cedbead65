#!/usr/bin/env bash
# The GPU machine's host CPU (AMX) measured across device calls: the cpu step of gpu_run.sh runs detached (its own
# process session), so that one measurement can outlast a call's 10 minutes; each call waits for it a while and brings
# back what it has so far. The machine keeps it only while calls follow each other within 30 s.
#
#   bash bench/gpu_bundle.sh pack-cpu                      # here: .carry/cpu/piece-1.tar.xz (61 MiB with onnxruntime)
#   bash bench/device_cpu.sh start 480                     # there, first call, carrying .carry/cpu and .carry/jglue.tar.xz
#   bash bench/device_cpu.sh wait 300                      # there, next call at once: until done or 300 s, whichever first
#
# FOS_* settings for gpu_run.sh pass through (FOS_CPU_SERVERS, FOS_CPU_DURATION, FOS_CPU_SHAPES, FOS_CPU_CONFIGS, ...).
# Measured on the H100's host (Intel Xeon, 16 vCPUs, 2026-11-27): models and four one-after-the-other exports 8.2
# minutes, each served engine about 90 s at FOS_CPU_DURATION=8 (now: the exports run at once where there are 8 cores or
# more).
# What comes back, under $OUT: results.tgz (gpu_run.sh's results folder), run.log, and cpu.txt (lscpu and the CPU's
# AVX-512 and AMX flags); `wait` prints "finished" with gpu_run.sh's exit status once it has ended.
set -uo pipefail
cd "$(dirname "$0")/.."
STATE=${FOS_DEVICE_STATE:-/tmp/fos-device-cpu}
RESULTS=${FOS_GPU_WORK:-/tmp/fos-gpu}/results
OUT=${OUT:?OUT: the folder whose files come back}

running() { [ -f "$STATE/pid" ] && [ ! -f "$STATE/rc" ] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; }

collect() {  # seconds: wait until the run has ended or the seconds have passed, then hand over what there is
  local t0=$SECONDS
  while running && [ $((SECONDS - t0)) -lt "$1" ]; do sleep 3; done
  tar czf "$OUT/results.tgz" -C "$RESULTS" . 2>/dev/null || true
  cp "$STATE/run.log" "$STATE/cpu.txt" "$OUT/" 2>/dev/null || true
  if [ -f "$STATE/rc" ]; then echo "finished: exit $(cat "$STATE/rc")"
  elif running; then echo "still running after $1 s"
  else echo "no measurement here: not started, or it ended without an exit status"; fi
  tail -40 "$STATE/run.log" 2>/dev/null
  [ -f "$STATE/rc" ] || running
}

case ${1:-} in
  start)
    if running; then echo "a measurement is already running (pid $(cat "$STATE/pid")): $0 wait" >&2; exit 1; fi
    mkdir -p "$STATE" && rm -f "$STATE/rc" "$STATE/pid"
    { lscpu; grep -o -w -E 'amx_[a-z0-9]+|avx512_[a-z0-9]+|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; } > "$STATE/cpu.txt"
    bash bench/gpu_bundle.sh unpack .carry/cpu > "$STATE/unpack.log" 2>&1 || { tail -20 "$STATE/unpack.log"; exit 1; }
    tar xJf .carry/jglue.tar.xz -C .carry || { echo "jglue: .carry/jglue.tar.xz did not unpack" >&2; exit 1; }
    # setsid: the device tool ends what a call leaves running, except a process in a session of its own.
    FOS_STEPS=cpu OUT=$STATE setsid bash -c 'bash bench/gpu_run.sh > "$OUT/run.log" 2>&1; echo $? > "$OUT/rc"' \
      < /dev/null > /dev/null 2>&1 &
    echo $! > "$STATE/pid"
    collect "${2:-480}"
    ;;
  wait) collect "${2:-300}" ;;
  *) echo "usage: $0 start [SECONDS] | wait [SECONDS]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The packages the GPU machine lacks, as small independent pieces that it can carry one call at a time.
#
#   bench/gpu_bundle.sh pack           # here: download the wheels if missing, build .carry/piece-*.tar.xz
#   bench/gpu_bundle.sh pack-cpu       # here: only what the host's CPU step needs (no CUDA, no Triton; onnxruntime's
#                                      # CPU build): .carry/cpu/, one piece, carried with jglue in one call (gpu_run.sh)
#   bash bench/gpu_bundle.sh unpack .carry   # there, once per call: install the pieces present, idempotently
#   eval "$(bash bench/gpu_bundle.sh env)"   # there: PYTHONPATH=/tmp/fos-site for what follows
#
# The GPU machine has Python 3.12 with torch, transformers, onnx, onnxruntime (CPU), grpcio, protobuf, ...
# but no fastapi/uvicorn/pydantic, fugashi + unidic-lite, tritonclient, onnxruntime-gpu or the tritonserver
# of nvidia-pytriton, and cannot download. Each call carries at most 64 MiB, so pieces are <= 58 MiB and each
# is a self-contained .tar.xz (concatenated xz/tar streams, one per unit): whichever subset has arrived is
# usable. Only a unit bigger than a piece (FOS_ORT_SM=all) is split into .split parts joined on arrival.
# Compressed units are cached in .carry/cache: a first pack takes ~7 min on 2 cores, a repack ~20 s.
#
# Environment: FOS_SITE (/tmp/fos-site: Python packages, for PYTHONPATH), FOS_TOOLS (/tmp/fos-tools: install
# markers, split parts, FOS_EXTRA), FOS_PYTHON (python3), FOS_ORT_SM (90: keep only the sm_90
# cubins of the onnxruntime CUDA provider, H100/H200; "all" keeps every architecture, ~3 more pieces),
# FOS_STRIP (1: strip symbols from the binaries that carry them), FOS_PIECE_MIB (58), FOS_EXTRA (more wheels,
# e.g. "numpy==1.26.4", unpacked into $FOS_TOOLS/extra, not on PYTHONPATH: the Python backend stub of
# nvidia-pytriton 0.7.0 returns empty outputs with numpy 2, which is what the GPU machine has).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$ROOT/.carry
PY=${FOS_PYTHON:-python3}
SITE=${FOS_SITE:-/tmp/fos-site}
TOOLS=${FOS_TOOLS:-/tmp/fos-tools}
PIECE_BYTES=$(( ${FOS_PIECE_MIB:-58} * 1024 * 1024 ))

# Versions: uv.lock's where it pins them; onnxruntime-gpu 1.31.1 is the CUDA 13 build that runs on the GPU
# machine's torch (cu130) CUDA libraries. Fallbacks are installed there only if its python3 lacks them
# (they normally come with onnx, huggingface-hub, onnxruntime, requests).
SITE_WHEELS="fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  httptools==0.9.0 fugashi==1.5.2 tritonclient==2.73.0 python-rapidjson==1.25 onnxruntime-gpu==1.31.1 nvidia-pytriton==0.7.0
  openvino==2026.4.1 nncf==3.4.0"
# nncf (fos export --openvino-int8) needs pydot; its other needs (networkx, psutil, rich, scipy, tabulate, ...) are on
# the GPU machine's image (/work/.library/device/KINDS.md).
# The CPU-only piece (pack-cpu) carries onnxruntime's CPU build instead of the GPU one: the GPU machine's own 1.30 does
# not fuse transformers 5's attention (export warns), which would leave ONNX Runtime's figures on an unfused graph.
CPU_WHEELS="onnxruntime==1.32.0"
FALLBACK_WHEELS="click==8.5.1 ml-dtypes==0.5.4 flatbuffers==25.12.19 packaging==26.4 urllib3==2.8.0
  openvino-telemetry==2025.2.0 pydot==4.0.1"

wheel_of() {  # "name==ver" -> the downloaded wheel's path, or nothing
  local n=${1%%==*} v=${1##*==}
  ls "$CARRY/wheels/${n//-/_}-$v-"*.whl 2>/dev/null | head -1
}

download() {
  local missing=() s
  for s in $SITE_WHEELS $CPU_WHEELS $FALLBACK_WHEELS ${FOS_EXTRA:-}; do [ -n "$(wheel_of "$s")" ] || missing+=("$s"); done
  [ ${#missing[@]} -eq 0 ] && return
  mkdir -p "$CARRY/wheels"
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$CARRY/wheels" \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${missing[@]}"
}

# Zero the payload of every cubin in the CUDA provider's .nv_fatbin that is not for the kept SM versions
# (headers stay, so the driver still sees a well-formed fatbin and picks the sm_90 image on H100/H200;
# the ~140 MB of zeros compress to nothing). The provider has no PTX, so nothing is lost for sm_90.
prune_fatbin() {
  "${FOS_PACK_PYTHON:-python3}" - "$1" "$2" <<'EOF'
import struct, sys
path, keep = sys.argv[1], {int(a) for a in sys.argv[2].split(",")}
data = bytearray(open(path, "rb").read())
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
secs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
strtab = secs[shstrndx][4]
off, size = next((s[4], s[5]) for s in secs if data[strtab + s[0]:].startswith(b".nv_fatbin\0"))
pos, end, kept, zeroed = off, off + size, 0, 0
while pos < end:  # fatbin containers, 8-byte aligned: header 0xBA55ED50, then entries
    magic, _, hsz, fsz = struct.unpack_from("<IHHQ", data, pos)
    if magic != 0xBA55ED50:
        pos += 8
        continue
    p, cend = pos + hsz, pos + hsz + fsz
    while p < cend:  # entry: kind, version, header size, padded payload size, ..., SM version at +28
        kind, _, ehsz, padded = struct.unpack_from("<HHII", data, p)
        sm, = struct.unpack_from("<I", data, p + 28)
        if sm in keep:
            kept += padded
        else:
            data[p + ehsz:p + ehsz + padded] = bytes(padded)
            zeroed += padded
        p += ehsz + padded
    pos = cend
if not kept:
    sys.exit(f"{path}: no cubin for sm {sorted(keep)}")
open(path, "wb").write(data)
print(f"  fatbin: kept {kept >> 20} MiB for sm {sorted(keep)}, zeroed {zeroed >> 20} MiB")
EOF
}

stage() {
  local st=$CARRY/stage s w
  rm -rf "$st" && mkdir -p "$st/site" "$st/fallback" "$st/cpu-site"
  for s in $SITE_WHEELS; do unzip -q -o "$(wheel_of "$s")" -d "$st/site"; done
  for s in $CPU_WHEELS; do unzip -q -o "$(wheel_of "$s")" -d "$st/cpu-site"; done
  rm -f "$st"/cpu-site/onnxruntime/capi/libonnxruntime.so.*  # the C API, as below: Python does not load it
  for s in $FALLBACK_WHEELS; do  # fallback/<import name>/: copied into the site only where missing
    w=$(wheel_of "$s"); s=${s%%==*}; unzip -q -o "$w" -d "$st/fallback/${s//-/_}"
  done
  for s in ${FOS_EXTRA:-}; do mkdir -p "$st/tools/extra" && unzip -q -o "$(wheel_of "$s")" -d "$st/tools/extra"; done
  rm -rf "$st"/tools/extra/numpy/*/tests "$st"/tools/extra/numpy/tests
  cd "$st/site"
  # onnxruntime-gpu: the Python module links neither libonnxruntime.so (the C API, for other languages)
  # nor the TensorRT provider (needs libnvinfer, not wanted); only the CUDA and shared providers stay.
  rm -f onnxruntime/capi/libonnxruntime.so.* onnxruntime/capi/libonnxruntime_providers_tensorrt.so
  if [ "${FOS_ORT_SM:-90}" != all ]; then prune_fatbin onnxruntime/capi/libonnxruntime_providers_cuda.so "${FOS_ORT_SM:-90}"; fi
  # nvidia-pytriton: only the tritonserver tree (binary, Python backend, local cache, the Python 3.12 stub)
  # and the libraries it links. shim/triton_server.py finds it as pytriton/tritonserver next to
  # nvidia_pytriton.libs, so the package stays, with an empty __init__ (the real one imports pytriton's own
  # client, which needs sh, zmq, wrapt, ... that are not carried). libpython3.13 is only for the 3.13 stub.
  find pytriton -mindepth 1 -maxdepth 1 ! -name tritonserver -exec rm -rf {} +
  echo '"""Only pytriton/tritonserver is carried (bench/gpu_bundle.sh)."""' > pytriton/__init__.py
  find pytriton/tritonserver/python_backend_stubs -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
  rm -f nvidia_pytriton.libs/libpython3-*.13.so*
  # OpenVINO (gpu_run.sh's cpu step, the host's AMX): its CPU plugin and the ONNX and IR readers; not the GPU and NPU
  # plugins (with the GPU plugin's kernel cache, cache.json), the other frameworks' readers or the C++ headers.
  rm -rf openvino/include openvino/cmake openvino/libs/cache.json openvino/libs/libopenvino_intel_{gpu,npu}_plugin.so \
    openvino/libs/libopenvino_{tensorflow,tensorflow_lite,paddle,pytorch,jax,gguf}_frontend.so.*
  # unidic-lite is an sdist: its built dictionary (data + __init__, any Python) comes from this venv.
  cp -a "$ROOT"/.venv/lib/python3*/site-packages/unidic_lite "$ROOT"/.venv/lib/python3*/site-packages/unidic_lite-*.dist-info .
  find "$st" -name __pycache__ -type d -prune -exec rm -rf {} +
  # Symbols only: these are not stripped upstream (debug info, mostly); run-time tested here.
  if [ "${FOS_STRIP:-1}" = 1 ]; then
    strip --strip-unneeded pytriton/tritonserver/bin/tritonserver pytriton/tritonserver/backends/python/libtriton_python.so \
      nvidia_pytriton.libs/libtritonserver-*.so rapidjson.cpython-312-*.so fugashi/fugashi.cpython-312-*.so \
      "$st"/fallback/ml_dtypes/ml_dtypes/_ml_dtypes_ext.cpython-312-*.so
  fi
}

# A unit: some paths of the stage as one tar.xz stream. Units are then packed into pieces (first fit,
# largest first); a piece is the concatenation of its units' streams, read with ignore_zeros.
pack() {  # [DEST [UNIT...]]: the pieces in DEST (default .carry), of these units only (default all)
  local t0=$SECONDS st=$CARRY/stage u=$CARRY/units dest=${1:-$CARRY}
  local only=("${@:2}")
  download
  echo "staging ..."; stage
  rm -rf "$u" "$dest"/piece-* && mkdir -p "$u" "$dest"
  cd "$st"
  local big=site/onnxruntime/capi/libonnxruntime_providers_cuda.so
  declare -A units=(
    [ort-cuda]="$big"
    [ort]="$(ls -d site/onnxruntime site/onnxruntime_gpu-*.dist-info)"
    [triton]="$(ls -d site/pytriton site/nvidia_pytriton.libs site/nvidia_pytriton-*.dist-info)"
    [unidic]="$(ls -d site/unidic_lite*)"
    [openvino]="$(ls -d site/openvino site/openvino-*.dist-info)"
    [fallback]=fallback
    [ort-cpu]=cpu-site
  )
  if [ -d tools ]; then units[extra]=tools; fi
  units[py]="$(ls -d site/* | grep -v -e '/onnxruntime' -e '/pytriton' -e '/nvidia_pytriton' -e '/unidic_lite' -e '/openvino')"
  if [ ${#only[@]} -eq 0 ]; then unset "units[ort-cpu]"; fi  # the GPU pieces carry onnxruntime-gpu in its place
  if [ ${#only[@]} -gt 0 ]; then
    local n
    for n in "${!units[@]}"; do [[ " ${only[*]} " == *" $n "* ]] || unset "units[$n]"; done
  fi
  # xz -9 beats zstd -19 --long here (unidic: 28.4 vs 33.9 MB). Reproducible tar streams (sorted, fixed
  # owner and mtime), so a unit whose content did not change is taken from .carry/cache, not recompressed.
  local name key tarc=(tar -cf - --sort=name --owner=0 --group=0 --numeric-owner --mtime=2020-01-01T00:00Z)
  mkdir -p "$CARRY/cache"
  for name in "${!units[@]}"; do
    local ex=(); [ "$name" = ort ] && ex=(--exclude="$big")
    # shellcheck disable=SC2086
    key=$("${tarc[@]}" "${ex[@]}" ${units[$name]} | sha256sum | cut -c1-16)
    if [ ! -e "$CARRY/cache/$name.$key.tar.xz" ]; then
      echo "compressing $name ..."
      # shellcheck disable=SC2086
      "${tarc[@]}" "${ex[@]}" ${units[$name]} | xz -9 -T0 > "$CARRY/cache/$name.$key.tmp"
      mv "$CARRY/cache/$name.$key.tmp" "$CARRY/cache/$name.$key.tar.xz"
    fi
    ln "$CARRY/cache/$name.$key.tar.xz" "$u/$name.tar.xz"
  done
  # Entries this run did not use, where it used them all (a pack of some units keeps the others' for the next pack).
  if [ ${#only[@]} -eq 0 ]; then find "$CARRY/cache" -type f -links 1 -delete; fi
  "${FOS_PACK_PYTHON:-python3}" - "$u" "$dest" "$PIECE_BYTES" <<'EOF'
import os, sys
units, out, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
sizes = {n[:-7]: os.path.getsize(os.path.join(units, n)) for n in os.listdir(units)}
pieces, splits = [], []
for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
    if size > cap:
        splits.append(name)
        continue
    for p in pieces:
        if sum(sizes[n] for n in p) + size <= cap:
            p.append(name)
            break
    else:
        pieces.append([name])
k = 0
for k, p in enumerate(pieces, 1):
    with open(os.path.join(out, f"piece-{k}.tar.xz"), "wb") as f:
        for n in p:
            f.write(open(os.path.join(units, n + ".tar.xz"), "rb").read())
for name in splits:  # parts of one stream: piece-K.NAME.IofN.split, usable once all N have arrived
    data = open(os.path.join(units, name + ".tar.xz"), "rb").read()
    parts = [data[i:i + cap] for i in range(0, len(data), cap)]
    for i, part in enumerate(parts, 1):
        k += 1
        open(os.path.join(out, f"piece-{k}.{name}.{i}of{len(parts)}.split"), "wb").write(part)
for n, s in sorted(sizes.items()):
    print(f"  unit {n}: {s} bytes")
EOF
  rm -rf "$u" "$st"
  local total=0 f
  for f in "$dest"/piece-*; do
    echo "$(basename "$f"): $(stat -c %s "$f") bytes ($(( $(stat -c %s "$f") >> 20 )) MiB)"
    total=$(( total + $(stat -c %s "$f") ))
  done
  echo "total $total bytes; pack took $(( SECONDS - t0 )) s"
}

# Extract one tar.xz stream (or concatenation of them) into DEST and print its top-level entries.
extract() {
  "$PY" - "$1" "$2" <<'EOF'
import sys, tarfile
src, dest = sys.argv[1], sys.argv[2]
with tarfile.open(src, "r:xz", ignore_zeros=True) as tar:
    names = tar.getnames()
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    tar.extractall(dest, **kw)
tops = sorted({"/".join(n.split("/")[:2]) for n in names if n.count("/") >= 1})
print("  " + " ".join(t.split("/", 1)[1] for t in tops))
EOF
}

install_tree() {  # site/ and cpu-site/ -> $SITE; tools/ -> $TOOLS; fallback/<mod>/ -> $SITE, only where the plain python3 cannot import <mod>
  local tmp=$1 m
  if [ -d "$tmp/site" ]; then cp -a "$tmp/site/." "$SITE/"; fi
  # onnxruntime's CPU build, unless the GPU pieces put onnxruntime-gpu there (a warm machine that had both)
  if [ -d "$tmp/cpu-site" ]; then
    if [ -d "$SITE/onnxruntime" ]; then echo "  onnxruntime (CPU): $SITE has one already, kept"; else cp -a "$tmp/cpu-site/." "$SITE/"; fi
  fi
  if [ -d "$tmp/tools" ]; then cp -a "$tmp/tools/." "$TOOLS/" && echo "  into $TOOLS: $(ls "$tmp/tools" | tr '\n' ' ')"; fi
  if [ -d "$tmp/fallback" ]; then
    for m in "$tmp"/fallback/*/; do
      m=$(basename "$m")
      if env -u PYTHONPATH "$PY" -c "import $m" 2>/dev/null; then
        echo "  fallback $m: already there, skipped"
      else
        cp -a "$tmp/fallback/$m/." "$SITE/" && echo "  fallback $m: installed"
      fi
    done
  fi
}

unpack() {
  local dir=${1:?usage: gpu_bundle.sh unpack DIR} f key tmp
  mkdir -p "$SITE" "$TOOLS/installed" "$TOOLS/split"
  shopt -s nullglob
  for f in "$dir"/piece-*.split; do  # gather parts; a unit is installed once all its parts are here
    cp -n "$f" "$TOOLS/split/"
  done
  for f in "$dir"/piece-*.tar.xz "$TOOLS"/split/*.1of*.split; do
    if [[ $f == *.split ]]; then  # piece-K.NAME.1ofN.split: join once parts 1..N are all here
      local rest name n i parts=()
      rest=$(basename "$f"); rest=${rest#piece-*.}; name=${rest%.1of*}; n=${rest##*.1of}; n=${n%.split}
      for i in $(seq 1 "$n"); do parts+=("$TOOLS"/split/piece-*."$name.${i}of$n.split"); done
      if [ ${#parts[@]} -ne "$n" ]; then echo "$name: ${#parts[@]} of $n parts so far"; continue; fi
      key=$name.$(sha256sum "$f" | cut -c1-16)
    else
      key=$(basename "$f").$(sha256sum "$f" | cut -c1-16)
    fi
    if [ -e "$TOOLS/installed/$key" ]; then echo "$(basename "$f"): already installed"; continue; fi
    tmp=$(mktemp -d "$TOOLS/x.XXXXXX")
    echo "$(basename "$f"):"
    if [[ $f == *.split ]]; then cat "${parts[@]}" > "$tmp.tar.xz"; extract "$tmp.tar.xz" "$tmp"; rm -f "$tmp.tar.xz"
    else extract "$f" "$tmp"; fi
    install_tree "$tmp"
    rm -rf "$tmp"
    touch "$TOOLS/installed/$key"
  done
  # onnxruntime-gpu's preload_dlls looks for CUDA and cuDNN in nvidia/ beside itself ($SITE); they are in the
  # plain python3's site-packages (torch's nvidia-* wheels). Without this link its CUDA provider cannot load
  # libcublasLt.so.13 in a process that has not imported torch (Triton's encoder) and the session runs on the CPU.
  local nv
  nv=$(env -u PYTHONPATH "$PY" -c 'import nvidia; print(next(iter(nvidia.__path__)))' 2>/dev/null) || nv=
  if [ -n "$nv" ] && [ ! -e "$SITE/nvidia" ]; then ln -s "$nv" "$SITE/nvidia" && echo "  $SITE/nvidia -> $nv"; fi
  echo "installed in $SITE: $(ls "$SITE" | grep -v -e dist-info -e '^__' | tr '\n' ' ')"
}

case ${1:-} in
  pack) pack ;;
  # One piece of 61 MiB, so that it and jglue travel in one call (64 MiB with the working tree).
  pack-cpu) PIECE_BYTES=$(( ${FOS_PIECE_MIB:-61} * 1024 * 1024 )); pack "$CARRY/cpu" unidic openvino py fallback ort-cpu ;;
  download) download ;;
  stage) download; stage ;;  # only the staging tree, .carry/stage (for checks)
  unpack) shift; unpack "$@" ;;
  env) echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}" ;;
  *) echo "usage: $0 pack | pack-cpu | download | stage | unpack DIR | env" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# infinity-emb (michaelfeil/infinity) as a benchmark baseline, in its own venv (not the project's).
#
#   bench/infinity.sh install
#   bench/infinity.sh serve torch|optimum EMBED_DIR [RERANK_DIR] PORT
#
# serve runs in the foreground on 127.0.0.1:PORT with the loadgen's routes and names:
#   POST /v1/embeddings, POST /v1/rerank, GET /v1/models, GET /health
#   models: $EMBED_NAME (default cl-nagoya/ruri-large), $RERANK_NAME (cl-nagoya/ruri-reranker-large)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${INFINITY_VENV:-$ROOT/.tools/infinity}
CACHE=${INFINITY_CACHE:-/tmp/bench/infinity-cache}   # mirrored model dirs + ONNX exports
PY=$VENV/bin/python

install() {
  command -v uv >/dev/null || python3 -m pip install -q uv
  [ -x "$PY" ] || uv venv -q --python 3.11 "$VENV"
  # The CPU torch wheel that lies on this machine; elsewhere torch 2.8.0 from PyPI (CUDA build, large;
  # it resolves within the snapshot below but was not tried here).
  local links=() torch='torch==2.8.0'
  if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then links=(--find-links /opt/wheels); torch='torch==2.13.0+cpu'; fi
  # infinity 0.0.78 needs numpy<2, sentence-transformers<4 and optimum 1.x with BetterTransformer
  # (which raises on import with transformers>=4.49): resolve the rest as of 2025-08-23 so that
  # pyarrow/onnxruntime/etc. still support numpy 1.x.  fugashi + unidic-lite: BertJapaneseTokenizer.
  uv pip install -q --python "$PY" "${links[@]}" \
    --exclude-newer 2025-08-23T00:00:00Z \
    --exclude-newer-package infinity-emb=2026-10-20T00:00:00Z \
    --exclude-newer-package torch=2026-12-31T00:00:00Z \
    "$torch" 'infinity-emb[server,torch,optimum]==0.0.78' 'sentence-transformers==3.4.1' \
    'transformers==4.48.3' 'tokenizers==0.21.4' 'optimum[onnxruntime]==1.24.0' 'onnx==1.18.0' \
    'onnxruntime==1.22.1' 'numpy==1.26.4' 'huggingface-hub==0.34.4' 'fastapi==0.116.1' \
    'uvicorn[standard]==0.32.1' 'datasets==4.0.0' 'pyarrow==21.0.0' 'fugashi==1.5.1' 'unidic-lite==1.0.8'
  "$PY" -c 'import infinity_emb, optimum.onnxruntime, fugashi, unidic_lite; print("infinity-emb", infinity_emb.__version__)'
}

# Mirror a model dir into $CACHE (weights symlinked; small files copied, because infinity's ONNX
# optimizer re-saves config/tokenizer files into the model dir and would write through symlinks),
# rewriting the sentence-transformers 6 module files into the 3.x format that infinity loads.
prepare() {  # SRC -> prints the prepared dir
  local src dst f
  src=$(cd "$1" && pwd); dst=$CACHE/$(echo "${src#/}" | tr / _)
  mkdir -p "$dst"
  ln -sfn "$src/model.safetensors" "$dst/model.safetensors"
  for f in config.json tokenizer_config.json vocab.txt special_tokens_map.json; do
    [ -e "$src/$f" ] && cp --remove-destination "$src/$f" "$dst/$f"
  done
  if [ -f "$src/modules.json" ]; then
    "$PY" - "$src" "$dst" <<'EOF'
import json, os, sys
src, dst = sys.argv[1:]
pool = json.load(open(f"{src}/1_Pooling/config.json"))
mode = pool.get("pooling_mode", "mean")
dim = pool.get("embedding_dimension") or json.load(open(f"{src}/config.json"))["hidden_size"]
os.makedirs(f"{dst}/1_Pooling", exist_ok=True)
json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
          open(f"{dst}/modules.json", "w"))
json.dump({"max_seq_length": 512, "do_lower_case": False}, open(f"{dst}/sentence_bert_config.json", "w"))
json.dump({"word_embedding_dimension": dim, "pooling_mode_cls_token": mode == "cls",
           "pooling_mode_mean_tokens": mode == "mean", "include_prompt": True},
          open(f"{dst}/1_Pooling/config.json", "w"))
EOF
  fi
  echo "$dst"
}

# optimum engine: infinity only loads an existing *.onnx next to the model; export it once.
# A plain transformers export (last_hidden_state / logits; infinity pools itself), with dynamo=False:
# torch>=2.9 defaults torch.onnx.export to the dynamo exporter (needs onnxscript; optimum 1.x predates it).
export_onnx() {  # DIR TASK
  [ -f "$1/model.onnx" ] && return
  echo "exporting $1 to ONNX ($2), once" >&2
  rm -rf "$1/.onnx-tmp"
  "$PY" - "$1" "$2" >&2 <<'EOF'
import functools, sys, torch.onnx
torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[1] + "/.onnx-tmp", task=sys.argv[2], library_name="transformers")
EOF
  mv "$1/.onnx-tmp/model.onnx" "$1/model.onnx"
  rm -rf "$1/.onnx-tmp"
}

serve() {
  [ $# -eq 3 ] || [ $# -eq 4 ] || { echo "usage: $0 serve torch|optimum EMBED_DIR [RERANK_DIR] PORT" >&2; exit 2; }
  local engine=$1 port=${*: -1} dirs=("$2") names=("${EMBED_NAME:-cl-nagoya/ruri-large}") tasks=(feature-extraction)
  [ $# -eq 4 ] && { dirs+=("$3"); names+=("${RERANK_NAME:-cl-nagoya/ruri-reranker-large}"); tasks+=(text-classification); }
  local args=() i d
  for i in "${!dirs[@]}"; do
    d=$(prepare "${dirs[$i]}")
    [ "$engine" = optimum ] && export_onnx "$d" "${tasks[$i]}"
    # mean pooling must be explicit: the optimum embedder treats "auto" as CLS pooling.
    # No warmup and no lengths-via-tokenize: both call tokenizer(...).encodings in the torch engine,
    # which BertJapaneseTokenizer (slow, MeCab; no fast version exists) does not have.
    args+=(--model-id "$d" --served-model-name "${names[$i]}" --engine "$engine" --device cpu
           --pooling-method mean --no-model-warmup --no-lengths-via-tokenize)
  done
  export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 INFINITY_ANONYMOUS_USAGE_STATS=0
  exec "$VENV/bin/infinity_emb" v2 "${args[@]}" --host 127.0.0.1 --port "$port" --url-prefix /v1
}

cmd=${1:-}; shift || true
case $cmd in
  install) install ;;
  serve) serve "$@" ;;
  *) echo "usage: $0 install | serve torch|optimum EMBED_DIR [RERANK_DIR] PORT" >&2; exit 2 ;;
esac

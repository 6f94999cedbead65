# syntax=docker/dockerfile:1
# NGC tritonserver plus what the exported tokenizer models import. Keep transformers at the
# version in uv.lock: the tokenizer must split text exactly as it did when the parity check ran.
# openvino and onnxruntime, at uv.lock's versions too, are for the Python-backend encoder of the CPU deployment
# (compose.cpu.yaml): OpenVINO bf16 on CPUs with AMX or AVX512-BF16, OpenVINO f32 on other AVX-512 CPUs, onnxruntime
# elsewhere. /trt-cache is the TensorRT engine cache's parent (export.repository.TENSORRT_CACHE): ONNX Runtime creates
# only a cache path's last level, so the folder exists whether or not compose mounts its volume there, writable by
# whichever user the container runs as (an empty named volume takes the folder's mode at its first mount).
ARG TRITON_VERSION=25.02
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3
RUN python3 -m pip install --no-cache-dir --break-system-packages \
        "transformers==5.24.0" \
        "fugashi==1.5.2" \
        "unidic-lite==1.0.8" \
        "sentencepiece==0.2.3" \
        "openvino==2026.4.1" \
        "onnxruntime==1.32.0" \
    && mkdir -p /trt-cache && chmod 1777 /trt-cache

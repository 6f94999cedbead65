# syntax=docker/dockerfile:1
# The shim: uv-installed from uv.lock, no torch, no benchmark tools (bench/), non-root. Target "export" adds torch and
# sentence-transformers for `fos export` (compose profile "export").
FROM python:3.11-slim-bookworm AS base
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:$PATH
WORKDIR /app
# The hf-cache volume mounts at the cache: made here, owned by fos, so that a new volume starts owned by fos too.
RUN useradd --create-home --uid 10001 fos \
    && mkdir -p /home/fos/.cache/huggingface \
    && chown -R fos /home/fos/.cache
COPY pyproject.toml uv.lock README.md ./

FROM base AS runtime
RUN uv sync --frozen --no-dev --no-install-project
COPY fos_runtime ./fos_runtime
COPY shim ./shim
COPY export ./export
RUN uv sync --frozen --no-dev
USER 10001
EXPOSE 8080
ENTRYPOINT ["fos"]
CMD ["serve", "--triton", "triton:8001", "--host", "0.0.0.0", "--port", "8080"]

FROM base AS export
RUN uv sync --frozen --no-dev --extra export --no-install-project
COPY fos_runtime ./fos_runtime
COPY shim ./shim
COPY export ./export
# Export writes and checks a model beside the repository before it moves it in: /app too must be fos's.
RUN uv sync --frozen --no-dev --extra export \
    && mkdir -p /app/model_repository \
    && chown 10001 /app /app/model_repository
USER 10001
ENTRYPOINT ["fos"]
CMD ["export", "--help"]

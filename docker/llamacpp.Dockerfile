# llama.cpp's server (llama-cpp-python[server]) for the compose service serve-llamacpp: a GGUF
# export on the CPU. Build from the repository root:
#   docker build -f docker/llamacpp.Dockerfile -t qlora-stack-llamacpp:latest .
#
# The first stage compiles llama-cpp-python from its sdist into a portable wheel with
# docker/llama-cpp.sh, the script `make venv-export` uses (GGML_NATIVE=OFF: AVX2-class CPUs, not
# the build machine's). BuildKit keeps that script's cache between builds, so a rebuild does not
# compile again. The image itself holds Python, OpenMP, the wheel and the project's serving
# package, which runs llama-cpp-python's server app as `make serve SERVE_BACKEND=llamacpp` does
# without Docker (serving/llamacpp_server.py: the run's limits, answers held to the context): no
# compiler, torch or training code. Any Debian/Ubuntu image with python3 >= 3.11 works as BASE_IMAGE.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS wheel
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions come from the distribution release that BASE_IMAGE pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates cmake g++ make python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir pip==26.3
COPY pyproject.toml /src/pyproject.toml
COPY docker/llama-cpp.sh /src/docker/llama-cpp.sh
RUN --mount=type=cache,target=/cache \
    wheels=$(PYTHON=/opt/build/bin/python LLAMA_CPP_CACHE=/cache /src/docker/llama-cpp.sh wheel) \
    && mkdir /wheels && cp "$wheels"/llama_cpp_python-*.whl /wheels/

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="qlora-stack-llamacpp" \
      org.opencontainers.image.description="llama.cpp server (llama-cpp-python) for GGUF exports" \
      org.opencontainers.image.licenses="Apache-2.0"
# libgomp1: llama.cpp's CPU backend is built with OpenMP.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgomp1 python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Pinned by requirements.lock, as in the project image: the server extra and what the serving
# package imports besides (huggingface_hub, httpx2, safetensors: small, pure or prebuilt).
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python3 -m venv "${VIRTUAL_ENV}" \
    && pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir -c /tmp/requirements.lock "$(ls /wheels/llama_cpp_python-*.whl)[server]" \
        uvicorn huggingface_hub httpx2 safetensors \
    && rm /tmp/requirements.lock
# The serving package alone, importable from here (no install: nothing else of the project is in the image).
COPY serving /opt/qlora-stack/serving
ENV PYTHONPATH=/opt/qlora-stack
# Any non-root user can read the model (the outputs volume is world-readable); numeric, so
# runAsNonRoot checks can verify it without /etc/passwd.
USER 65534:65534
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python3", "-m", "serving", "serve", "--backend", "llamacpp", "--help"]

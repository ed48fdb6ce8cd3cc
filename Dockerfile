# NV-Embed-v2 on Triton: NVIDIA's Triton image with this package installed. Mount the Hugging Face
# snapshot at /models/NV-Embed-v2 (docs/deployment.md):
#   docker build -t nvembed-triton .
#   docker run --gpus all --shm-size=2g -p 8000-8002:8000-8002 -p 8080:8080 -v /path/to/NV-Embed-v2:/models/NV-Embed-v2:ro nvembed-triton
#
# Base: 24.11-py3 is Triton 2.52.0 on Ubuntu 24.04 with Python 3.12 (the server repository's
# TRITON_VERSION and qa/L0_backend_python on branch r24.11; NVIDIA's release notes and
# compatibility matrix say "Ubuntu 24.04 including Python 3.12" from there on). It is the first
# release whose Python fits the pins (transformers 5 needs >= 3.11); 24.10 has Python 3.10. Its
# Python-backend stub is built for that Python and also reads BYTES with numpy 2 (python_backend
# #384); the pins keep numpy < 2 for the 2.51 server the tests run against.
# BASE_IMAGE is for tools/image_check.py, which builds this file unchanged on a local stand-in
# (no NGC registry there); deployments keep the default.
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.11-py3
FROM ${BASE_IMAGE}

# The base image's Python, the one its backend stub embeds: test_packaging resolves the
# dependencies for it.
ARG IMAGE_PYTHON=3.12

WORKDIR /opt/nvembed-triton

# jemalloc, which serve.sh preloads into tritonserver and its stubs (src/nvembed_triton/launcher/memory.py): under
# a long mixed load glibc malloc's memory kept growing (bench/RESULTS.md). NVIDIA's image ships it
# (Triton's build.py installs libjemalloc-dev); this installs it only where a base image lacks it.
# hadolint ignore=DL3008
RUN if [ ! -e "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" ]; then \
        apt-get update && apt-get install -y --no-install-recommends libjemalloc2 && rm -rf /var/lib/apt/lists/*; \
    fi

# Ubuntu 24.04 marks the system Python as externally managed; this image exists for this package.
ENV PIP_BREAK_SYSTEM_PACKAGES=1

# Dependencies first, from pyproject.toml and an empty package, so code changes reuse this layer.
# PyPI's default torch is a CUDA 13 build (NVIDIA driver >= 580); for an older driver install the
# matching build from PyTorch's index instead (docs/deployment.md).
COPY pyproject.toml README.md ./
COPY src/nvembed_triton/__init__.py src/nvembed_triton/__init__.py
# The serving extra: what the launcher, the model stubs and the OpenAI API need beside the image's own
# tritonserver (pyproject.toml); langchain for the client's adapter.
RUN pip install --no-cache-dir "torch==2.13.0" \
    && pip install --no-cache-dir ".[serving,langchain]"

COPY src ./src
RUN pip install --no-cache-dir --no-deps .

COPY serve.sh ./

# A container must listen on all its interfaces for published ports to reach it; on a plain machine
# serve.sh binds to 127.0.0.1 unless told otherwise.
ENV NVEMBED_MODEL_DIR=/models/NV-Embed-v2 \
    TRITON_HOST=0.0.0.0 \
    NVEMBED_OPENAI_PORT=8080 \
    HF_HUB_OFFLINE=1

# Triton HTTP, gRPC, metrics; the OpenAI/NIM-compatible embeddings API.
EXPOSE 8000 8001 8002 8080
# While serve.sh restarts a broken tritonserver its ports are closed, so this turns unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["curl", "-fsS", "http://localhost:8000/v2/models/nv-embed-v2/ready"]
# Unprivileged: uid 1000 is the NGC image's triton-server user (deploy/kubernetes runs as it too).
# HOME for a uid without a home directory elsewhere; nothing is written there.
USER 1000:1000
ENV HOME=/tmp
# SIGTERM drains (serve what was accepted, then exit) within NVEMBED_DRAIN_TIMEOUT_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["./serve.sh"]

# NV-Embed-v2 on Triton: NVIDIA's Triton server image (Triton 2.51, the release the tests run
# against) with this package installed. Mount the Hugging Face snapshot at /models/NV-Embed-v2:
#   docker build -t nvembed-triton .
#   docker run --gpus all -p 8001:8001 -v /path/to/NV-Embed-v2:/models/NV-Embed-v2:ro nvembed-triton
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/nvembed-triton

# Dependencies first, so code changes do not re-download torch. PyPI's default torch wheel is
# a CUDA build, which is what the GPU needs here.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir "torch==2.13.0" \
    && pip install --no-cache-dir ".[langchain]"

COPY model_repository ./model_repository
COPY serve.sh ./

# A container must listen on all its interfaces for published ports to reach it; on a plain machine
# serve.sh binds to 127.0.0.1 unless told otherwise.
ENV NVEMBED_MODEL_REPOSITORY=/opt/nvembed-triton/model_repository \
    NVEMBED_MODEL_DIR=/models/NV-Embed-v2 \
    TRITON_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1

EXPOSE 8000 8001 8002
# While serve.sh restarts a broken tritonserver its ports are closed, so this turns unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["curl", "-fsS", "http://localhost:8000/v2/models/nv-embed-v2/ready"]
ENTRYPOINT ["./serve.sh"]

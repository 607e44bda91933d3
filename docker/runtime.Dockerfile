# The runtime image: `pipeshift agent` (a stage pod) and `pipeshift frontend`, with torch.
#
# torch is installed first and exactly pinned (the version of the `runtime` extra in pyproject.toml),
# from the index named by TORCH_INDEX_URL, so nothing else resolves a different build:
#   CPU (default):  docker build -f docker/runtime.Dockerfile -t ghcr.io/pipeshift/runtime:0.1.0 .
#   CUDA 12.8:      docker build -f docker/runtime.Dockerfile \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                     -t ghcr.io/pipeshift/runtime:0.1.0-cu128 .
# The CUDA wheels bring their own CUDA runtime libraries; the node needs only the NVIDIA driver and
# device plugin (which advertises the nvidia.com/gpu resource the operator requests).
FROM python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# One stage: torch is installed into site-packages first, so the `runtime` extra finds it satisfied.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeshift ./pipeshift
RUN pip install --no-cache-dir ".[runtime]" && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}')"
WORKDIR /
RUN groupadd --gid 10001 pipeshift && useradd --uid 10001 --gid 10001 --no-create-home pipeshift
USER 10001:10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The operator sets the command (`pipeshift agent` or `pipeshift frontend`) and configures both
# through PIPESHIFT_* environment variables.
CMD ["pipeshift", "--help"]

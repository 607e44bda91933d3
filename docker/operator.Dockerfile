# The operator image: kopf, the Kubernetes client and pipeshift's pure-Python packages. No torch: the
# operator never imports it (an import contract in pyproject.toml keeps it that way), and the image
# stays small.
#
# Build from the repository root (BuildKit reads operator.Dockerfile.dockerignore next to this file):
#   docker build -f docker/operator.Dockerfile -t ghcr.io/pipeshift/operator:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeshift ./pipeshift
RUN pip install --no-cache-dir --prefix=/install ".[operator]"

FROM python:3.11-slim-bookworm
COPY --from=build /install /usr/local
# The chart runs the pod as this user with a read-only root filesystem.
RUN groupadd --gid 10001 pipeshift && useradd --uid 10001 --gid 10001 --no-create-home pipeshift
USER 10001:10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The chart sets the command and the flags (namespaces, Prometheus URL, log level).
CMD ["pipeshift", "operator"]

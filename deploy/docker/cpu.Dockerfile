# syntax=docker/dockerfile:1.7
# CPU image: Celery workers, the sampler, the trainer controller, and every service in dev.
# Build from the repository root: docker build -f deploy/docker/cpu.Dockerfile .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, as the CPU wheel (requirements.txt pins torch==2.13.0, which 2.13.0+cpu satisfies).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md* ./
COPY protos ./protos
COPY scripts ./scripts
COPY pony_common ./pony_common
COPY services ./services
RUN PY=/opt/venv/bin/python bash scripts/gen_protos.sh \
 && pip install --no-deps -e . --config-settings editable_mode=compat

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 pony && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home pony
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# Read-only root filesystem: everything that writes goes under /tmp (an emptyDir in the cluster).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    PONY_STATE_DIR=/tmp/pony
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["ponyctl"]
CMD ["--help"]

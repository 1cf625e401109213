# syntax=docker/dockerfile:1.7
# CUDA image: the GPU services (captioner, scorer, style-tagger, safety) and the training Jobs.
# The PyPI torch wheel is the CUDA build and carries its CUDA runtime libraries (nvidia-* wheels), so
# the node only needs the NVIDIA driver (provided by the GPU operator / device plugin).
# Build from the repository root: docker build -f deploy/docker/cuda.Dockerfile .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch==2.13.0
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
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    TRITON_CACHE_DIR=/tmp/triton-cache \
    PONY_STATE_DIR=/tmp/pony \
    PONY_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["ponyctl"]
CMD ["--help"]

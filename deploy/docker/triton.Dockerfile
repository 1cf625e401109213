# syntax=docker/dockerfile:1.7
# Triton image: tritonserver 2.51 (NGC 24.10) serving pony_v7 through the Python backend.
# Triton 24.10 ships Python 3.10, but our dependencies (transformers 5, diffusers 0.42) need 3.11. So
# the Python backend runs on Python 3.11: the venv below holds our deps, and the backend stub is the
# 3.11 build of the r24.10 stub that the nvidia-pytriton 0.7.0 wheel (Triton 2.51.0) ships.
# Build from the repository root: docker build -f deploy/docker/triton.Dockerfile .
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
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
# Python 3.11 stub for the Python backend (a link, so its $ORIGIN-relative RPATH still finds the
# libraries bundled in the wheel); fail the build if any of its libraries is missing.
RUN ln -sf /opt/venv/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
        /opt/tritonserver/backends/python/triton_python_backend_stub \
 && ! ldd /opt/tritonserver/backends/python/triton_python_backend_stub | grep "not found"

RUN groupadd --gid 10001 pony && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home pony
# The stub embeds the system python3.11, which does not read the venv's .pth files: put the venv's
# packages and the project (pony_common, services, the generated pony.v1 stubs) on its path.
ENV PYTHONPATH=/app:/opt/venv/lib/python3.11/site-packages \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    PONY_STATE_DIR=/tmp/pony
USER 10001:10001
ENTRYPOINT []
# The sampler renders the repository and loads pony_v7 through the model-control API (deploy/base/triton.yaml).
CMD ["tritonserver", "--model-repository=/triton-repo", "--model-control-mode=explicit"]

# CPU image: Celery workers, the sampler, the trainer controller, and every service in dev.
# Build from the repository root: docker build -f deploy/docker/cpu.Dockerfile .
# (No `# syntax=` line: the builder's built-in Dockerfile frontend is used, so no frontend image is pulled.)
# Build arguments: PYTHON_IMAGE (a Debian with Python 3.11 and `python` on PATH), TORCH_PIP_ARGS (where the
# CPU torch wheel comes from). Optional BuildKit secrets, mounted only while pip runs and in no layer: `ca` (the
# CA bundle pip trusts, e.g. behind a TLS-intercepting proxy) and `pipconf` (a pip.conf naming local mirrors).
# scripts/images.sh builds it on a machine without a registry.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, as the CPU wheel (requirements.txt pins torch==2.13.0, which 2.13.0+cpu satisfies).
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip install torch==2.13.0 ${TORCH_PIP_ARGS} \
 && python -c "import sys, torch; sys.exit(f'not the CPU torch: {torch.__version__}' if torch.version.cuda else 0)"
WORKDIR /app
COPY requirements.txt ./
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip install -r requirements.txt
COPY pyproject.toml README.md* ./
COPY protos ./protos
COPY scripts ./scripts
COPY pony_common ./pony_common
COPY services ./services
# Bytecode compiled here: the read-only root filesystem lets nothing write .pyc files at run time.
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    PY=/opt/venv/bin/python bash scripts/gen_protos.sh \
 && pip install --no-deps --no-cache-dir -e . --config-settings editable_mode=compat \
 && python -m compileall -q /app/pony /app/pony_common /app/services

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 pony && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home pony
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# Read-only root filesystem: everything that writes goes under /tmp (an emptyDir in the cluster).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/hf \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    PONY_STATE_DIR=/tmp/pony
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["ponyctl"]
CMD ["--help"]

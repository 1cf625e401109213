#!/usr/bin/env bash
# Builds the images the dev overlay deploys (pony-platform/cpu, pony-platform/triton) on this machine, and runs
# each service's container as its Pod runs it (`images.sh test`). `make images` / `make images-test`.
# `images.sh pin REGISTRY` writes the pushed images' digests into deploy/overlays/prod (at release).
#
# Works without a container registry: the base image is a debootstrapped Debian bookworm with its Python 3.11,
# torch comes from the CPU wheel on disk, pip's local mirrors and the machine's CA bundle reach the build as
# BuildKit secrets (never stored in a layer). Every choice can be overridden:
#   PONY_IMAGE_TAG        tag of both images (default: the one the dev overlay deploys, 0.1.0)
#   PONY_PYTHON_IMAGE     base image (default: pony-platform/python:3.11-bookworm, debootstrapped when missing;
#                         set python:3.11.14-slim-bookworm where a registry is reachable)
#   PONY_TORCH_PIP_ARGS   pip arguments naming torch's source (default: the CPU wheel found on this machine,
#                         served on loopback; else the Dockerfile's default, the PyTorch CPU index)
#   PONY_BUILD_CA         CA bundle for pip inside the build (default: pip's `cert` setting, if any)
#   PONY_TRITON_DOCKERFILE  deploy/docker/triton-cpu.Dockerfile (default; the wheel's tritonserver) or
#                         deploy/docker/triton.Dockerfile (NGC base image, needs nvcr.io)
#   DEBIAN_MIRROR         where debootstrap fetches bookworm (default: deb.debian.org)
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${PONY_IMAGE_TAG:-0.1.0}
PYTHON_IMAGE=${PONY_PYTHON_IMAGE:-pony-platform/python:3.11-bookworm}
TRITON_DOCKERFILE=${PONY_TRITON_DOCKERFILE:-deploy/docker/triton-cpu.Dockerfile}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STATE=${PONY_IMAGES_STATE:-/tmp/pony-images}
mkdir -p "$STATE"

log() { echo "images: $*" >&2; }
die() {
  echo "images: $*" >&2
  exit 2
}

# --- the engine -------------------------------------------------------------------------------------------
# `docker build` needs BuildKit (secret and cache mounts). A docker CLI with the buildx plugin has it; else
# Debian's docker.io client (/usr/bin/docker, 20.10) has it built in under DOCKER_BUILDKIT=1.
pick_client() {
  if docker buildx version >/dev/null 2>&1; then
    DOCKER=docker
  elif [ -x /usr/bin/docker ]; then
    DOCKER=/usr/bin/docker
  else
    DOCKER=docker
  fi
  export DOCKER_BUILDKIT=1
}

ensure_engine() {
  pick_client
  if "$DOCKER" info >/dev/null 2>&1; then
    return
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    command -v apt-get >/dev/null || die "no dockerd and no apt-get to install it (install Docker with BuildKit)"
    log "installing docker.io (dockerd, containerd, runc, a BuildKit-capable client)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  pick_client
  if "$DOCKER" info >/dev/null 2>&1; then
    return
  fi
  log "starting dockerd (log: $STATE/dockerd.log)"
  nohup dockerd --storage-driver=overlay2 >"$STATE/dockerd.log" 2>&1 &
  echo $! >"$STATE/dockerd.pid"
  for _ in $(seq 1 120); do
    "$DOCKER" info >/dev/null 2>&1 && return
    sleep 0.5
  done
  die "dockerd did not start; see $STATE/dockerd.log"
}

# --- the base image ---------------------------------------------------------------------------------------
# Debian bookworm (minbase) with python3.11, its venv module, libpython3.11 (Triton's Python stub embeds it)
# and Debian's CA certificates; `python` on PATH as in the python:*-slim images.
ensure_base() {
  if "$DOCKER" image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
    return
  fi
  [ "$PYTHON_IMAGE" = pony-platform/python:3.11-bookworm ] || return 0 # a registry image: the build pulls it
  command -v debootstrap >/dev/null || {
    log "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  local root="$STATE/rootfs"
  remove_root "$root"
  log "debootstrap bookworm into $root"
  debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$STATE/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $STATE/debootstrap.log"
  chroot "$root" apt-get install -y -qq --no-install-recommends \
    python3.11 python3.11-venv libpython3.11 ca-certificates >>"$STATE/debootstrap.log" 2>&1 ||
    die "installing python3.11 in the base failed; see $STATE/debootstrap.log"
  chroot "$root" apt-get clean
  ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
  ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/debootstrap "$root"/etc/resolv.conf "$root"/etc/hostname
  tar -C "$root" -c . | "$DOCKER" import \
    -c 'ENV LANG=C.UTF-8' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["python3"]' - "$PYTHON_IMAGE" >/dev/null
  remove_root "$root"
}

# A root left by an interrupted debootstrap may still have /proc or /sys mounted: unmount, never cross into them.
remove_root() {
  [ -e "$1" ] || return 0
  grep -o " $1/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$1"
}

# --- what the build reads from this machine ----------------------------------------------------------------
# pip's configuration here (find-links and extra-index-url folders, cert) becomes a loopback HTTP server for
# those folders, a pip.conf naming it (secret `pipconf`) and the CA bundle (secret `ca`): the build runs on the
# host network, reaches PyPI through the same CA, and no layer keeps either file.
SERVER_PID=""
stop_server() { [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT

prepare_sources() {
  SECRETS=()
  local served="$STATE/served"
  rm -rf "$served" && mkdir -p "$served"
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 scripts/build_pip_conf.py "$served" "$port" >"$STATE/pip.conf"
  local ca=${PONY_BUILD_CA:-$(sed -n 's/^# cert = //p' "$STATE/pip.conf")}
  if [ -n "$ca" ] && [ -f "$ca" ]; then
    SECRETS+=(--secret "id=ca,src=$ca")
    log "CA bundle for pip in the build (a secret, in no layer): $ca"
  fi
  TORCH_ARGS=()
  if ls "$served"/* >/dev/null 2>&1; then
    python3 -m http.server --bind 127.0.0.1 --directory "$served" "$port" >"$STATE/http.log" 2>&1 &
    SERVER_PID=$!
    SECRETS+=(--secret "id=pipconf,src=$STATE/pip.conf")
    log "local package folders served on 127.0.0.1:$port to the build: $(ls "$served" | wc -l)"
    # torch: the CPU wheel from those folders (the highest 2.13.0, +cpu) instead of the PyTorch CPU index.
    if find -L "$served" -maxdepth 3 -name 'torch-2.13.0+cpu-*.whl' 2>/dev/null | grep -q .; then
      TORCH_ARGS=(--build-arg "TORCH_PIP_ARGS=")
    fi
  fi
  if [ -n "${PONY_TORCH_PIP_ARGS+x}" ]; then
    TORCH_ARGS=(--build-arg "TORCH_PIP_ARGS=$PONY_TORCH_PIP_ARGS")
  fi
}

# --- build ------------------------------------------------------------------------------------------------
build_one() { # NAME DOCKERFILE [ARGS...]
  local name=$1 dockerfile=$2
  shift 2
  local t0=$SECONDS
  log "building $name:$TAG from $dockerfile"
  "$DOCKER" build --network=host --progress=plain -f "$dockerfile" -t "$name:$TAG" "$@" . >"$STATE/build-${name##*/}.log" 2>&1 ||
    {
      tail -30 "$STATE/build-${name##*/}.log" >&2
      die "building $name failed; see $STATE/build-${name##*/}.log"
    }
  local size
  size=$("$DOCKER" image inspect -f '{{.Size}}' "$name:$TAG")
  printf 'images: %-28s %6.2f GB  built in %4d s\n' "$name:$TAG" "$(awk "BEGIN {print $size / 1e9}")" $((SECONDS - t0)) >&2
}

build() {
  ensure_engine
  local t0=$SECONDS
  ensure_base
  prepare_sources
  build_one pony-platform/cpu deploy/docker/cpu.Dockerfile \
    --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" "${TORCH_ARGS[@]}" "${SECRETS[@]}"
  build_one pony-platform/triton "$TRITON_DOCKERFILE" --build-arg "CPU_IMAGE=pony-platform/cpu:$TAG"
  stop_server
  log "all images built in $((SECONDS - t0)) s"
}

# --- release: pin the prod overlay to the pushed images' digests -------------------------------------------
pin() {
  local registry=${1:-}
  [ -n "$registry" ] || die "usage: scripts/images.sh pin REGISTRY (after pushing REGISTRY/pony-platform/*:$TAG)"
  pick_client
  local kust=deploy/overlays/prod/kustomization.yaml name ref digest
  for name in cpu cuda triton; do
    ref=$("$DOCKER" image inspect -f '{{range .RepoDigests}}{{println .}}{{end}}' "$registry/pony-platform/$name:$TAG" |
      grep -m1 "^$registry/pony-platform/$name@sha256:" || true)
    [ -n "$ref" ] || die "no pushed digest for $registry/pony-platform/$name:$TAG: docker push it first"
    digest=${ref#*@}
    sed -i "/- name: pony-platform\/$name\$/{n;s/digest: sha256:[0-9a-f]*/digest: $digest/}" "$kust"
    [ "$name" != cuda ] || sed -i "s|PONY_TRAINER_IMAGE=pony-platform/cuda@sha256:[0-9a-f]*|PONY_TRAINER_IMAGE=pony-platform/cuda@$digest|" "$kust"
    log "pinned pony-platform/$name to $digest"
  done
}

case "${1:-build}" in
  build) build ;;
  test)
    build
    PONY_CONTAINER_TESTS=1 PONY_IMAGE_TAG=$TAG PONY_DOCKER=$DOCKER PONY_CONTAINER_REPORT="$STATE/readiness.json" \
      .venv/bin/python -m pytest -q -p no:cacheprovider -m containers tests/deploy/test_containers.py
    log "seconds from docker run to readiness: $(tr -d '\n{}" ' <"$STATE/readiness.json")"
    ;;
  pin) pin "${2:-}" ;;
  *) die "usage: scripts/images.sh [build|test|pin REGISTRY]" ;;
esac

#!/usr/bin/env bash
# Sets up .venv on a fresh machine (torch first, as the CPU wheel torch==2.13.0), installs the
# pinned dependencies and the project, and generates the gRPC stubs. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0 (CPU wheel)" >&2
  "${PIP[@]}" install torch==2.13.0
fi
stamp=.venv/.pony-deps
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing requirements" >&2
  "${PIP[@]}" install -r requirements.txt
  "${PIP[@]}" install --no-deps -e . --config-settings editable_mode=compat
  echo "$want" > "$stamp"
fi
bash scripts/gen_protos.sh

#!/usr/bin/env bash
# Generates the Python gRPC stubs (with .pyi) from protos/ into ./pony/v1 (never hand-edited, gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=.
mkdir -p pony/v1
"$PY" -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/pony/v1/*.proto

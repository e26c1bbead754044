#!/usr/bin/env bash
# Generates the stt.v1 package (messages, gRPC stubs, .pyi type stubs) from protos/ into stt/v1/.
# One command for every service and the SDK: `make protos`.
set -euo pipefail
PY=$(command -v "${1:-python}")
# protoc finds the mypy-protobuf plugins next to the interpreter.
export PATH="$(dirname "$PY"):$PATH"
cd "$(dirname "$0")/.."
rm -rf stt/v1
mkdir -p stt/v1
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  protos/stt/v1/*.proto
cat > stt/v1/__init__.py <<'PYEOF'
"""Generated from protos/stt/v1 by `make protos`. Do not edit."""
PYEOF
touch stt/v1/py.typed

#!/usr/bin/env bash
# Generates Python messages, gRPC stubs and .pyi type stubs from protos/ (`make protos`):
#   stt.v1           (public: Speech, Jobs)        -> stt/v1/                 (ships in the SDK)
#   stt.internal.v1  (Transcriber, JobStore)       -> services/shared/internal/v1/  (servers only)
set -euo pipefail
PY=$(command -v "${1:-python}")
# protoc finds the mypy-protobuf plugins next to the interpreter.
export PATH="$(dirname "$PY"):$PATH"
cd "$(dirname "$0")/.."
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$OUT" --grpc_python_out="$OUT" --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  protos/stt/v1/*.proto protos/stt/internal/v1/*.proto

rm -rf stt/v1 services/shared/internal
mkdir -p stt/v1 services/shared/internal/v1
mv "$OUT"/stt/v1/* stt/v1/
mv "$OUT"/stt/internal/v1/* services/shared/internal/v1/
# The internal modules live in the server package: point their imports of each other there.
sed -i 's/^from stt\.internal\.v1 import /from services.shared.internal.v1 import /; s/^import stt\.internal\.v1\./import services.shared.internal.v1./' \
  services/shared/internal/v1/*.py services/shared/internal/v1/*.pyi
sed -i 's/\bstt\.internal\.v1\.\([a-z_]*_pb2\)\b/services.shared.internal.v1.\1/g' services/shared/internal/v1/*.pyi

cat > stt/v1/__init__.py <<'PYEOF'
"""Generated from protos/stt/v1 by `make protos`. Do not edit."""
PYEOF
touch stt/v1/py.typed
cat > services/shared/internal/__init__.py <<'PYEOF'
"""Generated internal contracts (protos/stt/internal) by `make protos`. Do not edit."""
PYEOF
cat > services/shared/internal/v1/__init__.py <<'PYEOF'
"""Generated from protos/stt/internal/v1 by `make protos`. Do not edit."""
PYEOF

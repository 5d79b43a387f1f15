#!/usr/bin/env bash
# Runs every test: builds the guests and the host, then the unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
. scripts/env.sh
echo "==> host unit and end-to-end tests"
cargo test --workspace --locked

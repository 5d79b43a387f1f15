#!/usr/bin/env bash
# The main job, on its built-in default: sets up what is missing (the wasm targets, the build,
# the pinned models, with progress shown) and starts the gateway on plugins/eir.toml
# (http://127.0.0.1:8080, demo key "demo-key"). Extra arguments go to `eir serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if [ ! -x "$CARGO_TARGET_DIR/debug/eir" ] || [ ! -f plugins/dist/text_embed.wasm ] || [ ! -f plugins/dist/vad.wasm ]; then
    scripts/build.sh
fi
"$CARGO_TARGET_DIR/debug/eir" models fetch --dir models
exec "$CARGO_TARGET_DIR/debug/eir" serve --config plugins/eir.toml "$@"

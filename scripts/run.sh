#!/usr/bin/env bash
# The main job on its built-in default: builds what is missing, fetches the pinned model if it
# is missing, then embeds a sample sentence (or the sentences given as arguments) with the
# shipped text-embedding plugin and MiniLM, configured by plugins/eir.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
[ -f plugins/dist/text_embed.wasm ] || scripts/build.sh shipped
cargo build --locked --quiet -p eir --bin eir
"$CARGO_TARGET_DIR/debug/eir" models fetch minilm --dir models
if [ $# -eq 0 ]; then set -- "EIR runs inference plugins at the edge."; fi
inputs=()
for text in "$@"; do inputs+=(--input "text=$text"); done
exec "$CARGO_TARGET_DIR/debug/eir" run --config plugins/eir.toml text-embed "${inputs[@]}"

#!/usr/bin/env bash
# The main job on its built-in default: builds what is missing, then runs the shipped
# text-normalisation plugin on a sample text (or on the texts given as arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if [ ! -x "$CARGO_TARGET_DIR/debug/eir" ] || [ ! -f plugins/dist/text_normalize.wasm ]; then
    scripts/build.sh
fi
if [ $# -eq 0 ]; then set -- "  Ｅｄｇｅ   Inference ﬁrst:  Crème BRÛLÉE  "; fi
inputs=()
for text in "$@"; do inputs+=(--input "text=$text"); done
exec "$CARGO_TARGET_DIR/debug/eir" run plugins/dist/text_normalize.wasm "${inputs[@]}" \
    --param strip_accents=true --pretty

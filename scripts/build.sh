#!/usr/bin/env bash
# Builds everything: the guest components (wasm32-wasip2) and the host with the `eir` binary.
# Guests land in plugins/dist (shipped plugins) and tests/plugins/dist (test guests).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "==> adding the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi

echo "==> building guest components (wasm32-wasip2, release)"
cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release --workspace --locked
out="$CARGO_TARGET_DIR/wasm32-wasip2/release"
mkdir -p plugins/dist tests/plugins/dist
for crate in plugins/*/Cargo.toml; do
    name=$(basename "$(dirname "$crate")" | tr - _)
    cp "$out/$name.wasm" plugins/dist/
done
for crate in tests/plugins/*/Cargo.toml; do
    name=$(basename "$(dirname "$crate")")
    # A bin crate keeps dashes in its file name; a cdylib turns them into underscores.
    src="$out/$name.wasm"; [ -f "$src" ] || src="$out/$(echo "$name" | tr - _).wasm"
    cp "$src" "tests/plugins/dist/$(echo "$name" | tr - _).wasm"
done

echo "==> building the host (eir)"
cargo build --workspace --all-targets --locked
echo "==> done: $CARGO_TARGET_DIR/debug/eir; plugins in plugins/dist"

#!/usr/bin/env bash
# Builds everything: the guest components (wasm32-wasip2) and the host with the `eir` binary.
# Guests land in plugins/dist (shipped plugins) and tests/plugins/dist (test guests).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

for target in wasm32-wasip2 wasm32-wasip1; do
    if ! rustup target list --installed | grep -qx "$target"; then
        echo "==> adding the $target target"
        rustup target add "$target"
    fi
done

echo "==> building guest components (wasm32-wasip2, release)"
# Everything is a component, except the one test guest that stands for legacy wasip1 programs.
cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release --workspace --exclude legacy-nn --locked
cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip1 --release -p legacy-nn --locked
out="$CARGO_TARGET_DIR/wasm32-wasip2/release"
mkdir -p plugins/dist tests/plugins/dist
for crate in plugins/*/Cargo.toml; do
    name=$(basename "$(dirname "$crate")" | tr - _)
    cp "$out/$name.wasm" plugins/dist/
done
cp "$CARGO_TARGET_DIR/wasm32-wasip1/release/legacy-nn.wasm" tests/plugins/dist/legacy_nn.wasm
for crate in tests/plugins/*/Cargo.toml; do
    name=$(basename "$(dirname "$crate")")
    [ "$name" = legacy-nn ] && continue
    # A bin crate keeps dashes in its file name; a cdylib turns them into underscores.
    src="$out/$name.wasm"; [ -f "$src" ] || src="$out/$(echo "$name" | tr - _).wasm"
    cp "$src" "tests/plugins/dist/$(echo "$name" | tr - _).wasm"
done

echo "==> building the host (eir)"
cargo build --workspace --all-targets --locked
echo "==> done: $CARGO_TARGET_DIR/debug/eir; plugins in plugins/dist"

#!/usr/bin/env bash
# Builds EIR in parts; with no arguments, all of them:
#   plugins  the Rust guest components (wasm32-wasip2, and the one wasip1 test guest), into
#            plugins/dist (shipped plugins) and tests/plugins/dist (test guests)
#   shipped  only the shipped Rust plugins (what scripts/serve.sh needs)
#   langs    the Python, JavaScript and C plugins, with their pinned toolchains
#   host     the host with the `eir` binary and every test, bench and example target
# scripts/serve.sh needs only `shipped` and the `eir` binary; scripts/test.sh needs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
[ $# -gt 0 ] || set -- plugins langs host
tools="${EIR_TOOLS:-$HOME/.cache/eir/tools}"

out="$CARGO_TARGET_DIR/wasm32-wasip2/release"

build_shipped() {
    rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
    echo "==> building the shipped Rust plugins (wasm32-wasip2, release)"
    local crate packages=()
    for crate in plugins/*/Cargo.toml; do packages+=(-p "$(basename "$(dirname "$crate")")"); done
    cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release --locked "${packages[@]}"
    mkdir -p plugins/dist
    for crate in plugins/*/Cargo.toml; do
        cp "$out/$(basename "$(dirname "$crate")" | tr - _).wasm" plugins/dist/
    done
}

build_plugins() {
    build_shipped
    rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
    echo "==> building the test guests (wasm32-wasip2, and one wasip1 module)"
    # Everything is a component, except the test guests that stand for wasip1 programs written
    # for other hosts (the wasi-nn 0.6 crate; WasmEdge's GGML backend).
    cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release --workspace \
        --exclude legacy-nn --exclude wasmedge-ggml --locked
    cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip1 --release -p legacy-nn -p wasmedge-ggml --locked
    local crate name src
    mkdir -p tests/plugins/dist
    cp "$CARGO_TARGET_DIR/wasm32-wasip1/release/legacy-nn.wasm" tests/plugins/dist/legacy_nn.wasm
    cp "$CARGO_TARGET_DIR/wasm32-wasip1/release/wasmedge-ggml.wasm" tests/plugins/dist/wasmedge_ggml.wasm
    for crate in tests/plugins/*/Cargo.toml; do
        name=$(basename "$(dirname "$crate")")
        [ "$name" = legacy-nn ] || [ "$name" = wasmedge-ggml ] && continue
        # A bin crate keeps dashes in its file name; a cdylib turns them into underscores.
        src="$out/$name.wasm"; [ -f "$src" ] || src="$out/$(echo "$name" | tr - _).wasm"
        cp "$src" "tests/plugins/dist/$(echo "$name" | tr - _).wasm"
    done
}

build_langs() {
    scripts/toolchains.sh
    mkdir -p plugins/dist
    echo "==> building the Python plugin (componentize-py)"
    "$tools/py/bin/componentize-py" -d wit -w eir:plugin/pipeline componentize app -p plugins/py-embed \
        -o plugins/dist/py_embed.wasm >/dev/null
    rm -rf plugins/py-embed/__pycache__
    echo "==> building the JavaScript plugin (componentize-js)"
    (cd plugins/js-rank && PATH="$tools/js/node_modules/.bin:$PATH" npm run --silent build >/dev/null)
    echo "==> building the C plugin (clang, wit-bindgen c, wasm-component-ld)"
    make --no-print-directory -s -C plugins/c-vad WIT_BINDGEN="$tools/bin/wit-bindgen" \
        COMPONENT_LD="$tools/bin/wasm-component-ld" BUILD="$CARGO_TARGET_DIR/c-vad" OUT="$PWD/plugins/dist/c_vad.wasm"
}

build_host() {
    echo "==> building the host (eir, with its tests, benches and examples)"
    cargo build --workspace --all-targets --locked
}

for part in "$@"; do
    case "$part" in
        plugins) build_plugins ;;
        shipped) build_shipped ;;
        langs) build_langs ;;
        host) build_host ;;
        *) echo "scripts/build.sh: unknown part '$part' (plugins, shipped, langs or host)" >&2; exit 2 ;;
    esac
done
echo "==> built: $*"

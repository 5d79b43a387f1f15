"""ONNX Runtime timings of MiniLM for `scripts/bench.sh embed` (the baseline of EIR's BERT).

Builds MiniLM as ONNX from the same safetensors weights (scripts/make_minilm_onnx.py) and
prints one JSON object: median seconds per forward pass for each BATCHxSEQ shape given, on
the same token ids as the Rust side (see `ids` there).
Usage: ort_bert.py MODEL_DIR ITERATIONS THREADS BATCHxSEQ...
With EIR_BERT_ONNX=PATH the graph is also saved there (the bench runs it on EIR's ONNX backend).
"""

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from ort_bench import median_time


def ids(batch, seq):
    # [CLS] t t ... [SEP], t = 1000 + (7919 * k) % 20000 over the flattened position k.
    k = np.arange(batch * seq, dtype=np.int64).reshape(batch, seq)
    x = 1000 + (7919 * k) % 20000
    x[:, 0], x[:, -1] = 101, 102
    return x


def main():
    model_dir, iters, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_minilm_onnx.py"
    spec = importlib.util.spec_from_file_location("make_minilm_onnx", script)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/minilm.onnx"
        graph = maker.build(model_dir)
        onnx.save(graph, path)
        if os.environ.get("EIR_BERT_ONNX"):
            onnx.save(graph, os.environ["EIR_BERT_ONNX"])
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    out = {"version": ort.__version__}
    for shape in sys.argv[4:]:
        batch, seq = map(int, shape.split("x"))
        x = ids(batch, seq)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        out[shape] = median_time(lambda: session.run(None, feed), iters)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Builds a plain ONNX graph of a BERT encoder (all-MiniLM-L6-v2) from its safetensors weights.

The graph is written op by op with `onnx.helper` (no torch, no exporter, no fusions): inputs
`input_ids`, `attention_mask`, `token_type_ids` (int64, [batch, seq]), output
`last_hidden_state` (float32, [batch, seq, hidden]); opset 17 (LayerNormalization), GELU as
`x * 0.5 * (1 + erf(x / sqrt 2))`, attention as MatMul / Softmax with the mask added as
`(1 - mask) * -10000` (what transformers' BertModel does). It serves two purposes:
- ONNX Runtime's side of `scripts/bench.sh embed` (the same weights EIR's BERT runs);
- a batched transformer graph for EIR's own ONNX backend (tests/e2e/onnx.rs), whose output is
  checked against the sentence-transformers fixture (tests/fixtures/minilm_reference.json).

Needs only numpy and onnx. Run: python3 scripts/make_minilm_onnx.py models/minilm OUT.onnx
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path):
    """The tensors of a .safetensors file, by name (its header is JSON, its data raw)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(raw[base + start : base + end], dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out


class Graph:
    def __init__(self, weights):
        self.w = weights
        self.nodes = []
        self.inits = []
        self.names = set()
        self.count = 0

    def init(self, name, array):
        if name not in self.names:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
            self.names.add(name)
        return name

    def weight(self, name, transpose=False):
        w = self.w[name].astype(np.float32)
        return self.init(name + (".T" if transpose else ""), w.T if transpose else w)

    def const(self, value, dtype=np.float32):
        name = f"const_{self.count}"
        self.count += 1
        return self.init(name, np.array(value, dtype=dtype))

    def op(self, op, inputs, **attrs):
        out = f"{op.lower()}_{self.count}"
        self.count += 1
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x, prefix):
        # torch Linear: y = x W^T + b
        return self.op("Add", [self.op("MatMul", [x, self.weight(prefix + ".weight", True)]), self.weight(prefix + ".bias")])

    def layer_norm(self, x, prefix, eps):
        return self.op(
            "LayerNormalization",
            [x, self.weight(prefix + ".weight"), self.weight(prefix + ".bias")],
            axis=-1,
            epsilon=eps,
        )


def build(model_dir):
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    eps = cfg["layer_norm_eps"]
    head = hidden // heads
    g = Graph(read_safetensors(model_dir / "model.safetensors"))

    # Embeddings: word + position + token type, then LayerNorm.
    seq = g.op("Shape", ["input_ids"], start=1, end=2)  # [seq], 1-D
    first = g.const([0], np.int64)
    positions = g.op("Slice", [g.weight("embeddings.position_embeddings.weight"), first, seq, first])
    x = g.op("Gather", [g.weight("embeddings.word_embeddings.weight"), "input_ids"], axis=0)
    x = g.op("Add", [x, positions])
    x = g.op("Add", [x, g.op("Gather", [g.weight("embeddings.token_type_embeddings.weight"), "token_type_ids"], axis=0)])
    x = g.layer_norm(x, "embeddings.LayerNorm", eps)

    # The additive mask, [batch, 1, 1, seq].
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const([1, 2], np.int64)])
    mask = g.op("Mul", [g.op("Sub", [g.const(1.0), mask]), g.const(-10000.0)])
    split_heads = g.const([0, 0, heads, head], np.int64)  # Reshape's 0 keeps batch and seq
    merge_heads = g.const([0, 0, hidden], np.int64)
    scale = g.const(1.0 / np.sqrt(head))

    for i in range(layers):
        p = f"encoder.layer.{i}"

        def heads_of(name):
            t = g.op("Reshape", [g.linear(x, f"{p}.attention.self.{name}"), split_heads])
            return g.op("Transpose", [t], perm=[0, 2, 1, 3])  # [batch, heads, seq, head]

        q, k, v = heads_of("query"), heads_of("key"), heads_of("value")
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = g.op("Add", [g.op("Mul", [scores, scale]), mask])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_heads])
        attn = g.linear(ctx, f"{p}.attention.output.dense")
        x = g.layer_norm(g.op("Add", [attn, x]), f"{p}.attention.output.LayerNorm", eps)
        h = g.linear(x, f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Div", [h, g.const(np.sqrt(2.0))])])
        h = g.op("Mul", [g.op("Mul", [h, g.const(0.5)]), g.op("Add", [erf, g.const(1.0)])])
        out = g.linear(h, f"{p}.output.dense")
        x = g.layer_norm(g.op("Add", [out, x]), f"{p}.output.LayerNorm", eps)

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])
    graph = helper.make_graph(g.nodes, "minilm", ids, [out], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="eir make_minilm_onnx.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: make_minilm_onnx.py MODEL_DIR OUT.onnx")
    model = build(sys.argv[1])
    onnx.save(model, sys.argv[2])
    print(f"wrote {sys.argv[2]} ({len(model.graph.node)} nodes)")


if __name__ == "__main__":
    main()

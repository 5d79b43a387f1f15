#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into host/fuzz/corpus/<target>/.

- onnx: the hostile fixtures (tests/fixtures/hostile), the unsupported-operator fixture, and
  small valid graphs over the operators EIR implements (so mutations start from models that
  load and compute);
- bert: a tiny BERT (1 layer, hidden 8) as config.json + NUL + safetensors;
- kserve: JSON and binary KServe v2 requests as the gateway tests send them;
- tensor: wasi-nn tensors (rank/type byte, big-endian dims, data);
- config: the shipped plugins/eir.toml and a gateway configuration with tenants.

Usage: seeds.py   (needs onnx==1.23.2 and numpy; run from anywhere)
"""

import json
import os
import shutil
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def graph(name, nodes, inputs, inits=()):
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def onnx_seeds():
    for f in sorted(os.listdir(os.path.join(REPO, "tests/fixtures/hostile"))):
        if f.endswith(".onnx"):
            shutil.copy(os.path.join(REPO, "tests/fixtures/hostile", f), os.path.join(OUT, "onnx", f))
    shutil.copy(os.path.join(REPO, "tests/fixtures/unsupported_ops.onnx"), os.path.join(OUT, "onnx"))
    r = np.random.default_rng(7)
    w = lambda *s: r.standard_normal(s).astype(np.float32)
    write("onnx", "conv_relu.onnx", graph("conv", [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["y"])], [("x", [1, 2, 5, 5])], [("w", w(4, 2, 3, 3)), ("b", w(4))]))
    write("onnx", "depthwise_clip.onnx", graph("dw", [
        helper.make_node("Conv", ["x", "w"], ["c"], group=3, pads=[0, 1, 0, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], [("x", [1, 3, 6, 6])],
        [("w", w(3, 1, 3, 3)), ("lo", np.float32(0)), ("hi", np.float32(6))]))
    write("onnx", "matmul_softmax.onnx", graph("mm", [
        helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)],
        [("x", [2, 3, 4])], [("w", w(4, 5))]))
    write("onnx", "gemm_pool.onnx", graph("gp", [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)], [("x", [1, 1, 4, 4])], [("w", w(3, 4)), ("b", w(3))]))
    write("onnx", "lstm.onnx", graph("lstm", [
        helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], hidden_size=2)],
        [("x", [3, 1, 2])], [("w", w(1, 8, 2)), ("r", w(1, 8, 2)), ("b", w(1, 16))]))
    write("onnx", "shapes.onnx", graph("shapes", [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["z"]),
        helper.make_node("Add", ["x", "z"], ["a"]),
        helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("Pad", ["r", "pads"], ["p"]),
        helper.make_node("Slice", ["p", "st", "en"], ["sl"]),
        helper.make_node("Gather", ["sl", "idx"], ["g"]),
        helper.make_node("Tile", ["g", "reps"], ["y"])], [("x", [2, 3])],
        [("shape", np.array([3, 2], np.int64)), ("pads", np.array([1, 0, 1, 0], np.int64)),
         ("st", np.array([0], np.int64)), ("en", np.array([4], np.int64)), ("idx", np.array([0, 2], np.int64)),
         ("reps", np.array([2, 1], np.int64))]))


def bert_seed():
    hidden, inter, vocab, pos = 8, 16, 10, 8
    config = {"model_type": "bert", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": inter, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "max_position_embeddings": pos, "type_vocab_size": 2,
              "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}
    r = np.random.default_rng(3)
    t = {}
    def lin(name, i, o):
        t[f"{name}.weight"] = r.standard_normal((o, i)).astype(np.float32) * 0.1
        t[f"{name}.bias"] = np.zeros(o, np.float32)
    def norm(name):
        t[f"{name}.weight"] = np.ones(hidden, np.float32)
        t[f"{name}.bias"] = np.zeros(hidden, np.float32)
    t["embeddings.word_embeddings.weight"] = r.standard_normal((vocab, hidden)).astype(np.float32)
    t["embeddings.position_embeddings.weight"] = r.standard_normal((pos, hidden)).astype(np.float32)
    t["embeddings.token_type_embeddings.weight"] = r.standard_normal((2, hidden)).astype(np.float32)
    norm("embeddings.LayerNorm")
    p = "encoder.layer.0"
    for x in ("query", "key", "value"):
        lin(f"{p}.attention.self.{x}", hidden, hidden)
    lin(f"{p}.attention.output.dense", hidden, hidden)
    norm(f"{p}.attention.output.LayerNorm")
    lin(f"{p}.intermediate.dense", hidden, inter)
    lin(f"{p}.output.dense", inter, hidden)
    norm(f"{p}.output.LayerNorm")
    header, blobs, at = {}, [], 0
    for k, v in t.items():
        b = v.tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    h = json.dumps(header).encode()
    st = struct.pack("<Q", len(h)) + h + b"".join(blobs)
    write("bert", "tiny.bin", json.dumps(config).encode() + b"\0" + st)
    bad = dict(config, num_attention_heads=3)
    write("bert", "heads_do_not_divide.bin", json.dumps(bad).encode() + b"\0" + st)


def kserve_seeds():
    write("kserve", "texts.json", b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],"data":["Hello","world"]}]}')
    write("kserve", "nested.json", b'{"id":"7","inputs":[{"name":"logits","datatype":"FP32","shape":[2,3],"data":[[1,3,2],[0,0,9]]}],'
          b'"parameters":{"k":2},"outputs":[{"name":"indices","parameters":{"binary_data":true}}]}')
    head = b'{"inputs":[{"name":"x","datatype":"INT64","shape":[2],"parameters":{"binary_data_size":16}}]}'
    write("kserve", "binary.bin", bytes([len(head)]) + head + struct.pack("<qq", 1, -2))
    write("kserve", "bytes_binary.bin", b'\x5a' + b'{"inputs":[{"name":"t","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":9}}]}'[:90]
          + struct.pack("<I", 5) + b"hello")


def tensor_seeds():
    write("tensor", "f32_2x2", bytes([2 + 5 * 1]) + struct.pack(">II", 2, 2) + struct.pack("<4f", 1, 2, 3, 4))
    write("tensor", "i64_3", bytes([1 + 5 * 6]) + struct.pack(">I", 3) + struct.pack("<3q", 1, 2, 3))
    write("tensor", "huge_dims", bytes([4 + 5 * 2]) + struct.pack(">IIII", 0xFFFFFFFF, 0xFFFFFFFF, 2, 2))


def config_seeds():
    shutil.copy(os.path.join(REPO, "plugins/eir.toml"), os.path.join(OUT, "config", "eir.toml"))
    write("config", "tenants.toml", b'''[server]
listen = "127.0.0.1:0"
max_body = "8MiB"

[models.m]
path = "models/m"
family = "bert"

[plugins.p]
path = "p.wasm"
models = ["m"]
dirs = ["data::/data:ro"]
limits = { fuel = 1000, timeout = "2s", max_memory = "64MiB", max_compute_memory = "256MiB" }

[tenants.t]
keys_sha256 = ["00"]
plugins = ["*"]
max_concurrent = 2
rps = 10
ceilings = { timeout = "1s" }
''')


if __name__ == "__main__":
    for t in ("onnx", "bert", "kserve", "tensor", "config"):
        os.makedirs(os.path.join(OUT, t), exist_ok=True)
    onnx_seeds()
    bert_seed()
    kserve_seeds()
    tensor_seeds()
    config_seeds()
    print("seeds in", OUT, {t: len(os.listdir(os.path.join(OUT, t))) for t in os.listdir(OUT)})

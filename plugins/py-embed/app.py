"""Sentence embeddings in Python: the text-embed pipeline written against the WIT alone.

A pure-Python BERT tokenizer (basic tokenisation: clean-up, CJK splitting, lower-casing, accent
stripping, punctuation splitting; then greedy longest-match WordPiece) over the model's own
vocab.txt, the encoder through wasi-nn, then mean pooling over the attention mask and L2
normalisation. Same inputs, outputs and parameters as the Rust `text-embed` plugin.

Built with componentize-py against wit/ (world eir:plugin/pipeline).
"""

import array
import math
import operator
import unicodedata

import wit_world
import wit_world.exports
from componentize_py_types import Err
from wit_world.imports import eir_plugin_types as t
from wit_world.imports import graph, tensor

_VOCAB = {}


def vocab(path):
    if path not in _VOCAB:
        with open(path, encoding="utf-8") as f:
            _VOCAB[path] = {line.rstrip("\n"): i for i, line in enumerate(f)}
    return _VOCAB[path]


def fail(code, message):
    return Err(t.Error(code=code, message=message))


def is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(cp):
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_tokens(text):
    out = []
    for ch in text:
        cp = ord(ch)
        cat = unicodedata.category(ch)
        if cp == 0 or cp == 0xFFFD or (cat.startswith("C") and ch not in "\t\n\r"):
            continue
        if ch in " \t\n\r" or cat == "Zs":
            out.append(" ")
        elif is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = []
    for word in "".join(out).lower().split():
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        piece = ""
        for ch in word:
            if is_punctuation(ch):
                if piece:
                    words.append(piece)
                    piece = ""
                words.append(ch)
            else:
                piece += ch
        if piece:
            words.append(piece)
    return words


def wordpiece(word, vocab):
    if len(word) > 100:
        return [vocab["[UNK]"]]
    ids, start = [], 0
    while start < len(word):
        end, found = len(word), None
        while start < end:
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                found = vocab[sub]
                break
            end -= 1
        if found is None:
            return [vocab["[UNK]"]]
        ids.append(found)
        start = end
    return ids


def encode(text, vocab, max_tokens):
    ids = []
    for word in basic_tokens(text):
        ids.extend(wordpiece(word, vocab))
    return [vocab["[CLS]"]] + ids[: max_tokens - 2] + [vocab["[SEP]"]]


def param(request, name, default):
    for k, v in request.parameters:
        if k == name:
            return v
    return default


class Handler(wit_world.exports.Handler):
    def describe(self):
        spec = lambda n, d, s: t.TensorSpec(name=n, datatype=d, shape=s)
        return t.Metadata(
            description="Sentence embeddings in Python: WordPiece tokeniser, MiniLM via wasi-nn, mean pooling",
            inputs=[spec("text", t.Datatype.BYTES, [-1])],
            outputs=[
                spec("embedding", t.Datatype.FP32, [-1, -1]),
                spec("token_ids", t.Datatype.INT64, [-1, -1]),
                spec("token_counts", t.Datatype.INT64, [-1]),
            ],
        )

    def handle(self, request):
        texts = None
        for x in request.inputs:
            if x.name == "text":
                if not isinstance(x.data, t.TensorData_Bytes):
                    raise fail(t.ErrorCode.INVALID_INPUT, "`text` must be BYTES")
                texts = x.data.value
        if not texts:
            raise fail(t.ErrorCode.INVALID_INPUT, "missing input `text`")
        model = param(request, "model", "minilm")
        try:
            max_tokens = int(param(request, "max_tokens", "256"))
            if not 2 <= max_tokens <= 512:
                raise ValueError(f"max_tokens must be 2..=512, got {max_tokens}")
            sentences = [b.decode("utf-8") for b in texts]
        except ValueError as e:
            raise fail(t.ErrorCode.INVALID_INPUT, str(e))
        try:
            g = graph.load_by_name(model)
        except Err as e:
            raise fail(t.ErrorCode.MODEL_ERROR, f"loading `{model}`: {e.value.data()}")
        words = vocab(f"/models/{model}/vocab.txt")
        batch = [encode(s, words, max_tokens) for s in sentences]
        n, seq = len(batch), max(len(b) for b in batch)
        ids = array.array("q", [0]) * (n * seq)
        mask = array.array("q", [0]) * (n * seq)
        for i, b in enumerate(batch):
            for j, v in enumerate(b):
                ids[i * seq + j] = v
                mask[i * seq + j] = 1
        types = array.array("q", [0]) * (n * seq)
        named = [
            (name, tensor.Tensor([n, seq], tensor.TensorType.I64, values.tobytes()))
            for name, values in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types))
        ]
        try:
            outputs = g.init_execution_context().compute(named)
        except Err as e:
            raise fail(t.ErrorCode.MODEL_ERROR, f"running `{model}`: {e.value.data()}")
        hidden_t = dict(outputs)["last_hidden_state"]
        dims = hidden_t.dimensions()
        dim = dims[2]
        hidden = array.array("f")
        hidden.frombytes(hidden_t.data())
        embedding = array.array("f")
        for i, b in enumerate(batch):
            # Sum the sentence's token rows (map/operator keep the inner loop out of bytecode).
            acc = [0.0] * dim
            for j in range(len(b)):
                acc = list(map(operator.add, acc, hidden[(i * seq + j) * dim : (i * seq + j + 1) * dim]))
            count = len(b)
            acc = [a / count for a in acc]
            norm = math.sqrt(sum(a * a for a in acc)) or 1.0
            embedding.extend(a / norm for a in acc)
        token_ids = [v for b in batch for v in b + [0] * (seq - len(b))]
        return t.Response(
            outputs=[
                t.Tensor(name="embedding", shape=[n, dim], data=t.TensorData_Fp32(list(embedding))),
                t.Tensor(name="token_ids", shape=[n, seq], data=t.TensorData_Int64(token_ids)),
                t.Tensor(name="token_counts", shape=[n], data=t.TensorData_Int64([len(b) for b in batch])),
            ],
            parameters=[],
        )

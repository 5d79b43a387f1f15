#!/usr/bin/env python3
"""A stock NVIDIA Triton (KServe v2) HTTP client against `eir serve`.

Nothing here knows about EIR beyond the URL and the bearer key: it uses tritonclient[http]
as its documentation shows (binary tensor data, the default). Prints one JSON line of what it
saw; exits non-zero on any failure.

Usage: tritonclient_check.py HOST:PORT API_KEY
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main():
    url, key = sys.argv[1], sys.argv[2]
    headers = {"Authorization": f"Bearer {key}"}
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(headers=headers), "server not live"
    assert client.is_server_ready(headers=headers), "server not ready"
    assert client.is_model_ready("text-embed", headers=headers), "model not ready"
    meta = client.get_model_metadata("text-embed", headers=headers)
    assert meta["inputs"][0]["name"] == "text", meta

    # BYTES input sent as binary data (the client's default), outputs requested in binary.
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"Hello world", b"A man is eating food."], dtype=np.object_))
    out = httpclient.InferRequestedOutput("embedding", binary_data=True)
    result = client.infer("text-embed", [text], outputs=[out], headers=headers, request_id="tc-1")
    emb = result.as_numpy("embedding")
    assert emb.shape == (2, 384), emb.shape
    norms = np.linalg.norm(emb, axis=1)

    # FP32 input as binary, JSON output.
    logits = httpclient.InferInput("logits", [1, 4], "FP32")
    logits.set_data_from_numpy(np.array([[0.5, 2.0, -1.0, 1.0]], dtype=np.float32))
    top = client.infer(
        "topk",
        [logits],
        outputs=[httpclient.InferRequestedOutput("indices", binary_data=False)],
        headers=headers,
        parameters={"k": 2},
    )
    indices = top.as_numpy("indices").tolist()

    # Errors surface as InferenceServerException with the server's message.
    try:
        client.infer("no-such-model", [text], headers=headers)
        missing = "no error"
    except InferenceServerException as e:
        missing = e.message()

    print(
        json.dumps(
            {
                "embedding_shape": list(emb.shape),
                "norms": [round(float(n), 5) for n in norms],
                "first": [round(float(v), 6) for v in emb[0][:3]],
                "request_id": result.get_response().get("id"),
                "topk_indices": indices,
                "missing_model_error": missing,
            }
        )
    )


if __name__ == "__main__":
    main()

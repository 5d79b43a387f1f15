#!/usr/bin/env python3
"""The stock `openai` Python client against `eir serve`'s OpenAI-compatible API.

Nothing here knows about EIR beyond the base URL and the key: it calls the client as its
documentation shows, plain and streamed. Prints one JSON line of what it saw; exits non-zero on
any failure.

Usage: openai_check.py BASE_URL API_KEY MODEL EMBEDDING_MODEL
"""

import json
import sys

import openai


def main():
    base, key, model, embedder = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    models = [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "Write a haiku about edge computing."}]

    plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    # The client asks for base64 by default and decodes it.
    emb = client.embeddings.create(model=embedder, input=["Hello world", "Edge inference"])
    vectors = [d.embedding for d in emb.data]
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        missing = None
    except openai.NotFoundError as e:
        missing = e.status_code
    try:
        client.chat.completions.create(model=model, messages=[])
        empty = None
    except openai.BadRequestError as e:
        empty = e.status_code
    print(json.dumps({
        "models": models,
        "plain": plain.choices[0].message.content,
        "plain_finish": plain.choices[0].finish_reason,
        "plain_usage": plain.usage.completion_tokens,
        "streamed": "".join(deltas),
        "stream_chunks": len(deltas),
        "stream_finish": finish,
        "stream_usage": usage,
        "completion_tokens": completion.usage.completion_tokens,
        "embedding_dims": [len(v) for v in vectors],
        "embedding_norms": [round(sum(x * x for x in v) ** 0.5, 4) for v in vectors],
        "embedding_first": [round(x, 6) for x in vectors[0][:3]],
        "missing_model": missing,
        "empty_messages": empty,
    }))


if __name__ == "__main__":
    main()

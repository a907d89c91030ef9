"""`/v1/embeddings` through the queue to a worker serving the bundled all-MiniLM-L6-v2, called
with the OpenAI SDK, LangChain and plain HTTP, unchanged."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import MINILM, SMOLLM, Proc, error_of
from tests.integration.test_batches import results, run_batch

FOOD = "A man is eating food."
BREAD = "A man is eating a piece of bread."
BABY = "The girl is carrying a baby."


@pytest.fixture
def client(base_url: str, embedder: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def same(a: Any, b: Any) -> bool:
    """The same unit vector(s) to rounding: which sequences share a decode changes the order of
    llama.cpp's sums over F16 weights, by up to ~1e-4 per component (each is as far from an F32
    reference computation, cosine 0.999999)."""
    return bool(np.all(np.sum(np.asarray(a) * np.asarray(b), axis=-1) > 0.99999))


def vectors(client: openai.OpenAI, inputs: Any) -> np.ndarray:
    r = client.embeddings.create(model=MINILM, input=inputs)
    return np.array([d.embedding for d in r.data])


def test_one_string_through_the_sdks_default_base64(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model=MINILM, input=FOOD)
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"  # the SDK's ask
    wire = raw.http_response.json()
    assert isinstance(wire["data"][0]["embedding"], str)  # so the answer came as base64
    r = raw.parse()
    assert r.object == "list" and r.model == MINILM and len(r.data) == 1
    assert r.data[0].object == "embedding" and r.data[0].index == 0
    assert len(r.data[0].embedding) == 384
    assert abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-5
    # [CLS] a man is eating food . [SEP]
    assert r.usage.prompt_tokens == r.usage.total_tokens == 8


def test_a_list_comes_back_in_input_order(client: openai.OpenAI) -> None:
    texts = [FOOD, BREAD, BABY, "Hello world", "A cat sat on the mat."]
    r = client.embeddings.create(model=MINILM, input=texts)
    assert [d.index for d in r.data] == list(range(len(texts)))
    together = np.array([d.embedding for d in r.data])
    alone = np.array([vectors(client, t)[0] for t in texts])
    assert same(together, alone)  # each row is its own input's vector
    assert r.usage.prompt_tokens == sum(
        client.embeddings.create(model=MINILM, input=t).usage.prompt_tokens for t in texts)


def test_float_and_base64_are_the_same_unit_vector(http: httpx.Client, embedder: Proc) -> None:
    body = {"model": MINILM, "input": [FOOD, BABY]}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    b64 = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), "<f4")
        assert np.array_equal(np.array(f["embedding"], dtype=np.float32), decoded)
        assert abs(float(np.linalg.norm(decoded)) - 1) < 1e-5
    assert floats["usage"] == b64["usage"] == {"prompt_tokens": 17, "total_tokens": 17}


def test_identical_inputs_give_identical_vectors(client: openai.OpenAI) -> None:
    twice = vectors(client, [BREAD, BREAD])
    assert np.array_equal(twice[0], twice[1])  # in one decode: bit for bit
    assert np.array_equal(twice, vectors(client, [BREAD, BREAD]))  # the same request again
    assert same(twice[0], vectors(client, BREAD)[0])  # alone: to rounding (see same())
    assert not np.allclose(twice[0], vectors(client, BABY)[0], atol=1e-2)


def test_a_paraphrase_scores_closer_than_an_unrelated_sentence(client: openai.OpenAI) -> None:
    triples = [(FOOD, BREAD, BABY),
               ("How do I reset my password?", "I forgot my password and need to change it.",
                "The weather in Lisbon is sunny today."),
               ("The stock market fell sharply.", "Share prices dropped a lot.",
                "She plays the violin beautifully.")]
    for anchor, paraphrase, unrelated in triples:
        a, p, u = vectors(client, [anchor, paraphrase, unrelated])
        assert a @ p > a @ u + 0.3, (anchor, a @ p, a @ u)
    # all-MiniLM-L6-v2's published score for the first pair (sentence-transformers' docs): 0.7553
    a, p, _ = vectors(client, [FOOD, BREAD, BABY])
    assert abs(a @ p - 0.7553) < 0.005


def test_token_arrays_embed_as_their_text(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = [http.post("/extras/tokenize", json={"model": MINILM, "input": t}).json()["tokens"]
           for t in (FOOD, BABY)]
    assert ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] ... [SEP], as the text gets them
    one = client.embeddings.create(model=MINILM, input=ids[0])
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids[0])
    assert same(one.data[0].embedding, vectors(client, FOOD)[0])
    many = np.array([d.embedding for d in client.embeddings.create(model=MINILM, input=ids).data])
    assert same(many, vectors(client, [FOOD, BABY]))


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": ""}, "input", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": ["fine", ""]}, "input", "invalid_value"),
    ({"input": [[]]}, "input", "invalid_value"),
    ({"input": [1, "x"]}, "input", "invalid_value"),
    ({"input": ["x"] * 2049}, "input", "invalid_value"),
    ({"input": "x", "dimensions": 256}, "dimensions", "invalid_value"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "x", "truncate": True}, "truncate", "unknown_parameter"),
    ({"input": "word " * 600}, "input", "context_length_exceeded"),
    ({"input": ["short", "word " * 600]}, "input[1]", "context_length_exceeded"),
    ({"input": [[101, 30522, 102]]}, "input", "invalid_value"),
    ({"input": "x", "model": SMOLLM}, "model", "model_not_supported"),
    ({}, "input", "missing_required_parameter"),
    ({"input": 5}, "input", "invalid_value"),
    ({"input": [101, -1, 102]}, "input", "invalid_value"),
    ({"input": [101] * 600}, "input", "context_length_exceeded"),
    ({"input": "x", "model": None}, "model", "invalid_value"),
])
def test_bad_input_is_a_400_in_openais_shape(http: httpx.Client, embedder: Proc,
                                             body: dict[str, Any], param: str, code: str) -> None:
    err = error_of(http.post("/v1/embeddings", json={"model": MINILM, **body}), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["code"] == code, err


def test_models_of_the_other_kind_and_unknown_ones_are_refused(
        client: openai.OpenAI, http: httpx.Client) -> None:
    assert vectors(client, "x").shape == (1, 384)
    assert http.post("/v1/embeddings", json={"model": MINILM, "input": "x",
                                             "dimensions": 384}).status_code == 200  # its own size
    err = error_of(http.post("/v1/chat/completions", json={
        "model": MINILM, "messages": [{"role": "user", "content": "Hi"}]}), 400)
    assert err["param"] == "model" and err["code"] == "model_not_supported"
    assert "embedding model" in str(err["message"])
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model=SMOLLM, input="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_langchain_openai_embeddings(base_url: str, embedder: Proc, client: openai.OpenAI) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model=MINILM, base_url=base_url + "/v1", api_key="unused",  # type: ignore[arg-type]
                          check_embedding_ctx_length=False)
    docs = np.array(lc.embed_documents([FOOD, BREAD, BABY]))
    query = np.array(lc.embed_query(FOOD))
    assert docs.shape == (3, 384)
    assert same(docs, vectors(client, [FOOD, BREAD, BABY]))
    assert same(query, docs[0])
    assert query @ docs[1] > query @ docs[2]


def test_an_embeddings_batch_of_20_lines(client: openai.OpenAI) -> None:
    texts = [f"Sentence number {i} is about {'food' if i % 2 else 'the sea'}." for i in range(20)]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MINILM, "input": t, "encoding_format": "float"}}
             for i, t in enumerate(texts)]
    batch = run_batch(client, lines, endpoint="/v1/embeddings")
    assert batch.status == "completed" and batch.request_counts.completed == 20, batch
    out = results(client, batch.output_file_id)
    direct = vectors(client, texts)
    for i in range(20):
        body = out[f"e{i}"]["response"]["body"]
        assert out[f"e{i}"]["response"]["status_code"] == 200
        assert body["object"] == "list" and body["model"] == MINILM
        assert same(body["data"][0]["embedding"], direct[i])
    assert batch.usage.input_tokens == sum(out[f"e{i}"]["response"]["body"]["usage"]["prompt_tokens"]
                                           for i in range(20))  # type: ignore[union-attr]
    assert batch.usage.output_tokens == 0  # type: ignore[union-attr]


def test_a_batch_for_a_generating_model_fails_validation(client: openai.OpenAI) -> None:
    lines = [{"custom_id": "g", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": SMOLLM, "input": "x"}}]
    batch = run_batch(client, lines, endpoint="/v1/embeddings")
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "model_not_supported"  # type: ignore[union-attr]


def packed(http: httpx.Client) -> tuple[int, int]:
    """(decodes, decodes that held at most 8 jobs) for the embedding model, from /metrics."""
    text = http.get("/metrics").text

    def value(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    label = f'model="{MINILM}"'
    return (value(rf'ferry_embedding_jobs_per_decode_count{{{label}}} (\d+)'),
            value(rf'ferry_embedding_jobs_per_decode_bucket{{{label},le="8"}} (\d+)'))


def test_concurrent_requests_share_one_decode(base_url: str, embedder: Proc,
                                              http: httpx.Client) -> None:
    """16 requests sent while a long one runs wait together, then go out in one decode."""
    before = packed(http)
    answers: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            r = c.post("/v1/embeddings", json={"model": MINILM, "input": f"Request {i} here.",
                                               "encoding_format": "float"})
            answers[i] = np.array(r.json()["data"][0]["embedding"])

    long_status: list[int] = []
    long = threading.Thread(target=lambda: long_status.append(http.post("/v1/embeddings", json={
        "model": MINILM, "input": [f"A long input, number {i}, " + "with words " * 40
                                   for i in range(100)]}).status_code))  # ~9,000 tokens, 50 kB
    long.start()
    time.sleep(0.3)  # on the worker by now, and busy for seconds
    small = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in small:
        t.start()
    for t in [long, *small]:
        t.join()
    decodes, up_to_8 = (a - b for a, b in zip(packed(http), before, strict=True))
    assert len(answers) == 16 and long_status == [200]
    assert up_to_8 < decodes, "no decode held more than 8 of the 17 requests"
    with httpx.Client(base_url=base_url, timeout=60) as c:  # what each got is its own vector
        solo = c.post("/v1/embeddings", json={"model": MINILM, "input": "Request 3 here.",
                                              "encoding_format": "float"}).json()
    assert same(answers[3], solo["data"][0]["embedding"])

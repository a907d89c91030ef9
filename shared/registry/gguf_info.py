"""What a GGUF file says about itself, read from its header without loading the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import InvalidRequest

MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def read(path: Path) -> dict[str, Any]:
    """Architecture, parameter count, quantisation, context length, chat template, size.

    Raises `InvalidRequest` when the file is not a GGUF.
    """
    if not is_gguf(path):
        raise InvalidRequest(f"{path.name} is not a GGUF file", param="source_url",
                             code="invalid_model_file")
    import gguf  # a few hundred ms to import; only model imports and downloads need it

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct.error, ... on a damaged file
        raise InvalidRequest(f"{path.name} is not a readable GGUF file: {e}",
                             param="source_url", code="invalid_model_file") from e

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = field("general.architecture")
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type else None
    except ValueError:
        quant = None
    return {
        "architecture": arch,
        "name": field("general.name"),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "size_label": field("general.size_label"),
        "quantization": quant,
        "context_length": field(f"{arch}.context_length") if arch else None,
        "chat_template": field("tokenizer.chat_template"),
        "size": path.stat().st_size,
        "kv_bytes_per_token": _kv_bytes_per_token(field, arch) if arch else None,
        # Set (mean, CLS, last, ...) for an embedding model: llama.cpp pools its outputs.
        "pooling_type": field(f"{arch}.pooling_type") if arch else None,
        "embedding_length": field(f"{arch}.embedding_length") if arch else None,
        "vocab_size": len(tokens.data) if (tokens := reader.fields.get("tokenizer.ggml.tokens")) else None,
    }


def _kv_bytes_per_token(field: Any, arch: str) -> int | None:
    """Bytes of f16 K and V cache one token of context takes, over every layer."""
    n_layer, n_embd = field(f"{arch}.block_count"), field(f"{arch}.embedding_length")
    n_head = field(f"{arch}.attention.head_count")
    if not (n_layer and n_embd and n_head):
        return None
    n_head_kv = field(f"{arch}.attention.head_count_kv") or n_head
    heads = sum(n_head_kv) if isinstance(n_head_kv, list) else n_head_kv * n_layer
    head_k = field(f"{arch}.attention.key_length") or n_embd // (
        max(n_head) if isinstance(n_head, list) else n_head)
    head_v = field(f"{arch}.attention.value_length") or head_k
    return int(heads * (head_k + head_v) * 2)

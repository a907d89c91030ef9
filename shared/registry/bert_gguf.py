"""Write a sentence-transformers BERT (safetensors weights, tokenizer.json) as a BERT GGUF.

llama.cpp's own converter (`convert_hf_to_gguf.py`, its `BertModel`) needs torch and
transformers; this does what it does for a plain BERT with the `gguf` package and numpy alone:
the same hyperparameters and tensor names, its WordPiece vocabulary in "phantom space" form, the
pooling from the model's sentence-transformers config, and its `--outtype f16`: 2-D weights F16,
the rest F32 (position and token-type embeddings stay F32, as it keeps them). Weights must be
F32 or F16, as sentence-transformers ships them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
# Tensors llama.cpp's BERT does not use (BertModel.filter_tensors).
_SKIP = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
# Added to F32 activations, so kept in F32 (as the converter and llama-quantize keep them).
_F32 = ("position_embd.weight", "token_types.weight")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte header length, JSON header, raw data), mapped."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} is {info['dtype']}; only F32, F16, I64")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _pooling(model_dir: Path) -> Any:
    """The pooling type sentence-transformers' `modules.json` names (BertModel's
    `_try_set_pooling_type`); mean if the model has no such config."""
    import gguf

    modules = model_dir / "modules.json"
    for module in json.loads(modules.read_text()) if modules.is_file() else []:
        if module["type"].endswith("Pooling"):
            config = json.loads((model_dir / module["path"] / "config.json").read_text())
            if config.get("pooling_mode_cls_token"):
                return gguf.PoolingType.CLS
            if config.get("pooling_mode_lasttoken"):
                return gguf.PoolingType.LAST
            if config.get("pooling_mode_mean_tokens"):
                return gguf.PoolingType.MEAN
            raise ValueError(f"{model_dir.name}: unsupported pooling {config}")
    return gguf.PoolingType.MEAN


def _vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[Any]]:
    """WordPiece tokens by id, as llama.cpp's WPM tokenizer reads them: a word-initial piece
    gets a leading U+2581, a `##` continuation loses its `##`; special tokens stay as they are."""
    import gguf

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    if tokenizer["model"]["type"] != "WordPiece":
        raise ValueError(f"{model_dir.name}: tokenizer is {tokenizer['model']['type']}, not WordPiece")
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    special = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(token[2:] if token.startswith("##") else "\u2581" + token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def convert(model_dir: Path, out: Path, name: str) -> Path:
    """Write `model_dir` (config.json, model.safetensors, tokenizer.json) to `out`."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise ValueError(f"{model_dir.name}: model_type {config.get('model_type')!r} is not bert")
    n_layer = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name(name)
    writer.add_block_count(n_layer)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling(model_dir))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tokens, types = _vocab(model_dir, config["vocab_size"])
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # BERT's [CLS] is llama.cpp's BOS, which it knows for a "bert" vocabulary; GGUF has no CLS key.
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens),
                      special_token_types=("bos", "eos", "unk", "sep", "pad", "mask"),
                      ).add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    for hf_name, tensor in read_safetensors(model_dir / "model.safetensors").items():
        hf_name = hf_name.removeprefix("bert.")
        if hf_name in _SKIP:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{model_dir.name}: no GGUF name for tensor {hf_name}")
        dtype = np.float16 if tensor.ndim == 2 and gguf_name not in _F32 else np.float32
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=dtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def convert_once(zipped: Path, out: Path, name: str) -> Path:
    """`out`, converted from the model folder zipped in `zipped` the first time it is asked for.
    Processes asking at once wait on a lock and find it written; a half-written file never has
    `out`'s name (written beside it, then renamed)."""
    import fcntl
    import os
    import tempfile
    import zipfile

    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():  # another process converted it while this one waited
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as scratch:
            with zipfile.ZipFile(zipped) as z:
                z.extractall(scratch)
            partial = Path(scratch) / out.name
            convert(Path(scratch), partial, name)
            os.replace(partial, out)
    return out

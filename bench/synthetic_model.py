"""A Llama-architecture GGUF of any size with random weights, for benchmarks where no hub is
reachable and no wheel ships a model that large.

Speed does not depend on what the weights say: with `ignore_eos` and a fixed `max_tokens`, a
model of random weights decodes exactly as many tokens, through the same kernels, as a trained
one of the same shape and type. Its text is gibberish. It takes the bundled SmolLM2's tokenizer
and chat template, so every API works against it.

    python bench/synthetic_model.py --out /models/synthetic-1b.gguf            # ~1.2B, Q4_0
    python bench/synthetic_model.py --out m.gguf --shape 3b --type q8_0
    python bench/stream.py --gpu 0 --model-path /models/synthetic-1b.gguf --levels 1 8 32

Shapes (hidden, layers, feed-forward, heads, KV heads) follow well-known open models: 1b is
TinyLlama-1.1B's, 3b Llama 3.2 3B's, 8b Llama 3.1 8B's; with SmolLM2's 49,152-token vocabulary
(untied output) they come to about 1.2B, 3.1B and 7.4B parameters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.registry.models import resolve  # noqa: E402

# name: (hidden, layers, feed-forward, attention heads, KV heads)
SHAPES = {
    "tiny": (256, 2, 512, 4, 2),  # seconds to write: a smoke test of this script
    "1b": (2048, 22, 5632, 32, 4),
    "3b": (3072, 28, 8192, 24, 8),
    "8b": (4096, 32, 14336, 32, 8),
}
TYPES = {
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
}
TOKENIZER = "smollm2-135m-instruct"  # the bundled model lends its vocabulary and chat template


def tokenizer_fields(reader: gguf.GGUFReader) -> list[tuple[str, object, gguf.GGUFValueType,
                                                             gguf.GGUFValueType | None]]:
    """The tokenizer's keys (vocabulary, merges, special tokens, chat template), as written."""
    out = []
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            out.append((field.name, field.contents(), kind, sub))
    return out


def write(out: Path, shape: str, qtype: str, seed: int = 0) -> int:
    """Write the model; its parameter count."""
    hidden, layers, ffn, heads, kv_heads = SHAPES[shape]
    tensor_type, file_type = TYPES[qtype]
    source = gguf.GGUFReader(resolve(TOKENIZER, Path("/nonexistent")).path)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(f"synthetic-{shape} (random weights, {qtype})")
    writer.add_context_length(32768)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(file_type)
    for name, value, kind, sub in tokenizer_fields(source):
        writer.add_key_value(name, value, kind, sub_type=sub)

    rng = np.random.default_rng(seed)
    params = 0

    def matrix(name: str, rows: int, cols: int) -> None:
        nonlocal params
        # Scaled so activations keep their size through the layers (no inf, no NaN).
        data = rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)
        params += data.size
        writer.add_tensor(name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    matrix("output.weight", vocab, hidden)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    p.add_argument("--shape", choices=SHAPES, default="1b")
    p.add_argument("--type", choices=TYPES, default="q4_0", help="the matrices' type")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    params = write(args.out, args.shape, args.type, args.seed)
    print(f"{args.out}: {params / 1e9:.2f}B parameters, {args.type}, "
          f"{args.out.stat().st_size / 2**30:.2f} GiB, written in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""A model's chat template: a format llama-cpp-python ships, named by the model's record, else the
template the GGUF carries."""

from __future__ import annotations

from typing import Any

from llama_cpp import llama_chat_format
from llama_cpp._internals import LlamaModel


def format_gemma(messages: list[Any], **kwargs: Any) -> llama_chat_format.ChatFormatterResponse:
    """llama-cpp-python's Gemma format drops system messages without a word (Gemma has no system
    turn); Gemma 3's own template puts the system prompt at the head of the first user turn, and
    so does this."""
    system = "\n\n".join(m["content"] or "" for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if system:
        if rest and rest[0]["role"] == "user":
            rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content'] or ''}"}
        else:
            rest.insert(0, {"role": "user", "content": system})
    return llama_chat_format.format_gemma(rest, **kwargs)


# Chat formats llama-cpp-python ships, for GGUFs that carry no template of their own.
NAMED_FORMATS: dict[str, llama_chat_format.ChatFormatter] = {
    "gemma": format_gemma,
    "chatml": llama_chat_format.format_chatml,
    "llama-2": llama_chat_format.format_llama2,
    "mistral-instruct": llama_chat_format.format_mistral_instruct,
}


def chat_formatter(model: LlamaModel, chat_format: str | None
                   ) -> llama_chat_format.ChatFormatter | None:
    """The model's chat template: a named format, else the GGUF's own; None if it has neither."""
    if chat_format is not None:
        return NAMED_FORMATS[chat_format]
    template = model.metadata().get("tokenizer.chat_template")
    if template is None:
        return None
    eos, bos = model.token_eos(), model.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=model.detokenize([eos], special=True).decode(errors="replace"),
        bos_token=model.detokenize([bos], special=True).decode(errors="replace") if bos >= 0 else "",
        stop_token_ids=[eos],
    )

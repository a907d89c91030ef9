"""A model's chat template: a format llama-cpp-python ships, named by the model's record, else the
template the GGUF carries."""

from __future__ import annotations

from llama_cpp import llama_chat_format
from llama_cpp._internals import LlamaModel

# Chat formats llama-cpp-python ships, for GGUFs that carry no template of their own.
NAMED_FORMATS: dict[str, llama_chat_format.ChatFormatter] = {
    "gemma": llama_chat_format.format_gemma,
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

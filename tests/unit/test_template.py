"""The named chat formats Ferry uses for GGUFs without a template of their own."""

from __future__ import annotations

from workers.chat.template import NAMED_FORMATS


def test_gemma_keeps_the_system_prompt_in_the_first_user_turn() -> None:
    """llama-cpp-python's Gemma format drops system messages; Codex sends ~10k tokens there."""
    prompt = NAMED_FORMATS["gemma"](messages=[
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]).prompt
    assert prompt == ("<start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n"
                      "<start_of_turn>model\nHello<end_of_turn>\n"
                      "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    only_system = NAMED_FORMATS["gemma"](messages=[{"role": "system", "content": "S"}]).prompt
    assert only_system.startswith("<start_of_turn>user\nS<end_of_turn>")

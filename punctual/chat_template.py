"""A conversation as prompt tokens: the tokenizer's chat template, as the server and `LLM.chat` apply it."""
from __future__ import annotations


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        add_special_tokens: bool = False, **template_kwargs) -> tuple[str, list[int]]:
    """The text the chat template makes of `messages` (dicts with role and content) and its token
    ids. ValueError if the tokenizer has no template or the template refuses the messages."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    except Exception as exc:  # no template, or the template refused these messages
        raise ValueError(f"cannot apply the chat template: {exc}") from None
    # The template already wrote the special tokens; by default the tokenizer adds no more.
    return text, tokenizer.encode(text, add_special_tokens=add_special_tokens)

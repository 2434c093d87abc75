"""Chats to token ids, and which of the tokens are the assistant's (the loss of completion-only training).

A chat template with {% generation %} blocks (the built-in templates, TRL's training versions of
Qwen2.5, Qwen3, Llama 3, ...) marks the assistant's text itself, and transformers turns the marks
into a token mask. Many base models' own templates have none, and TRL has no training version of
them (Llama 3.1 and 3.2, ...). For those the assistant's text is found by
rendering: each assistant turn is what the template adds to the conversation before it, rendered
with the generation prompt, when the turn is rendered too. That holds for every template whose
rendering of a conversation starts with its rendering of any earlier part of it; where it does
not (a template that rewrites earlier turns, as Qwen3's drops their reasoning, or that writes the
system prompt or the tools into the last user turn, as Mistral's v0.3 does), the row is refused,
named, rather than trained on a guess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jinja2 import TemplateError

from training.errors import DataError

if TYPE_CHECKING:
    from training.data.example import Example

NOT_A_PREFIX_HINT = (
    "so the assistant's turns cannot be told from the rest for completion-only loss. Set "
    "data.completion_only_loss: false to train on every token, or use a built-in or custom template"
)


def tokenize_chats(
    tokenizer,
    chats: list[Example],
    *,
    tools: list[dict] | None,
    chat_template: str | None,
    completion_only: bool,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """The chats' token ids (as apply_chat_template tokenizes them) and, with `completion_only`, a
    mask per chat with 1 on the assistant's tokens; all chats share `tools`."""
    from trl.chat_template_utils import has_generation_markers

    if completion_only and not has_generation_markers(chat_template or tokenizer.chat_template):
        return _masked_by_rendering(tokenizer, chats, tools, chat_template)
    out = tokenizer.apply_chat_template(
        [e.messages for e in chats],
        tools=tools,
        chat_template=chat_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=completion_only,
    )
    return out["input_ids"], out["assistant_masks"] if completion_only else None


def _masked_by_rendering(
    tokenizer, chats: list[Example], tools: list[dict] | None, chat_template: str | None
) -> tuple[list[list[int]], list[list[int]]]:
    if not tokenizer.is_fast:  # offsets of tokens in the text come from the fast (Rust) tokenizers only
        raise DataError(
            f"completion-only loss with a chat template without {{% generation %}} markers needs a fast "
            f"tokenizer, and {type(tokenizer).__name__} is not; {NOT_A_PREFIX_HINT}"
        )
    texts, spans = [], []
    for example in chats:
        text, turns = _assistant_spans(tokenizer, example, tools, chat_template)
        texts.append(text)
        spans.append(turns)
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    masks = [
        # A token is the assistant's where its text overlaps the turn's, as transformers marks the
        # tokens of a {% generation %} block (from the token of its first character to its last's).
        [int(any(start < end_ and end > start_ for start_, end_ in turns)) for start, end in offsets]
        for offsets, turns in zip(out["offset_mapping"], spans, strict=True)
    ]
    return out["input_ids"], masks


def _assistant_spans(
    tokenizer, example: Example, tools: list[dict] | None, chat_template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The chat as the template renders it (`chat_template`, else the tokenizer's own, which picks its
    tool-use variant where it has named ones), and where in that text each assistant turn is."""
    messages = example.messages

    def render(upto: int, add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto],
                tools=tools,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as e:  # a template may refuse a conversation cut short (raise_exception)
            raise DataError(
                f"{example.where}: the chat template refuses the conversation up to message {upto}: {e}; "
                f"{NOT_A_PREFIX_HINT}"
            ) from None

    text = render(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"{example.where}: the chat template renders the conversation up to message {i} (an "
                f"assistant turn) differently when later messages follow, {NOT_A_PREFIX_HINT}"
            )
        # Whitespace after the turn's end-of-turn token is the template's, not the model's to write.
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans

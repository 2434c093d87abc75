"""Completion-only loss on a base model's own chat template without {% generation %} markers: the
assistant's turns are found by rendering, and count exactly as a marked template counts them."""

from __future__ import annotations

import pytest
from trl.chat_template_utils import (
    get_training_chat_template,
    has_generation_markers,
    llama3_1_chat_template,
    llama3_2_chat_template,
    llama3_chat_template,
    qwen2_5_chat_template,
)

from tests.training.data.test_tool_calls import (
    OPENAI_ROW,
    WEATHER,
    jsonl,
    masked_spans,
    model_section,
    with_template,
    without_ids,
)
from training.data.chat_tokens import tokenize_chats
from training.data.formats import messages_example
from training.data.prepare import prepare_data
from training.errors import DataError

CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "서울의 날씨는?"},
        {"role": "assistant", "content": "맑아요."},
        {"role": "user", "content": "東京は?"},
        {"role": "assistant", "content": "雨です。"},
    ]
}


@pytest.mark.parametrize(
    ("template", "row"),
    [(qwen2_5_chat_template, OPENAI_ROW), (qwen2_5_chat_template, CHAT), (llama3_chat_template, CHAT)],
    ids=["qwen2.5-tools", "qwen2.5-chat", "llama3-chat"],
)
def test_rendering_finds_the_turns_trls_training_template_marks(llama_tokenizer, template, row):
    tokenizer = with_template(llama_tokenizer, template)
    training = get_training_chat_template(tokenizer)
    assert not has_generation_markers(template) and has_generation_markers(training)
    example = messages_example(row, None)
    marked = tokenize_chats(
        tokenizer, [example], tools=example.tools, chat_template=training, completion_only=True
    )
    rendered = tokenize_chats(
        tokenizer, [example], tools=example.tools, chat_template=template, completion_only=True
    )
    assert rendered[0] == marked[0]  # the same tokens
    # The same turns, end-of-turn token included; TRL's blocks also hold the newlines around them.
    spans = masked_spans(tokenizer, rendered[0][0], rendered[1][0])
    assert spans == [s.strip("\n") for s in masked_spans(tokenizer, marked[0][0], marked[1][0])]
    assert len(spans) == 2 and all(s.endswith(("<|im_end|>", "<|eot_id|>")) for s in spans)


def test_llama_3_1_trains_on_its_answers_and_tool_calls_only(tmp_path, llama_tokenizer):
    """Llama 3.1's template has no markers and TRL no training version of it: completion-only loss
    (the default) used to stop the run before training."""
    llama31 = with_template(llama_tokenizer, llama3_1_chat_template)
    with pytest.raises(ValueError, match="not supported"):
        get_training_chat_template(llama31)
    path = jsonl(tmp_path / "d.jsonl", [without_ids(OPENAI_ROW), CHAT])
    data = prepare_data(model_section(path, max_length=4096, validation=None), llama31)
    assert data.chat_template == llama3_1_chat_template  # saved and served as the base model's
    spans = sorted(map(spans_of(llama31), data.train))
    assert spans == [
        ['{"name": "get_weather", "parameters": {"city": "Seoul"}}<|eot_id|>', "Clear, 21 °C.<|eot_id|>"],
        ["맑아요.<|eot_id|>", "雨です。<|eot_id|>"],
    ]
    # The tools, the tool result and the system and user turns are rendered, not counted.
    text = "".join(llama31.decode(row["input_ids"]) for row in data.train)
    assert all(
        part in text for part in ("temp_c", WEATHER["function"]["description"], "Answer briefly.", "東京は?")
    )


def spans_of(tokenizer):
    return lambda row: masked_spans(tokenizer, row["input_ids"], row["assistant_masks"])


# Marks the last message, as templates that render the final turn apart from earlier ones do.
LAST_TURN_APART = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} (last){% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_a_template_that_renders_earlier_turns_apart_is_refused_with_the_row(tmp_path, llama_tokenizer):
    tokenizer = with_template(llama_tokenizer, LAST_TURN_APART)
    path = jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(DataError) as e:
        prepare_data(model_section(path), tokenizer)
    assert str(e.value) == (
        f"{path} line 1: the chat template renders the conversation up to message 2 (an assistant turn) "
        "differently when later messages follow, so the assistant's turns cannot be told from the rest "
        "for completion-only loss. Set data.completion_only_loss: false to train on every token, or use a "
        "built-in or custom template"
    )
    assert (
        prepare_data(model_section(path, completion_only_loss=False), tokenizer).train_report.tokens.rows == 1
    )


def test_llama_3_2_plain_chats_keep_the_answers(tmp_path, llama_tokenizer):
    llama32 = with_template(llama_tokenizer, llama3_2_chat_template)
    path = jsonl(tmp_path / "d.jsonl", [CHAT] * 3)
    data = prepare_data(model_section(path, max_length=4096), llama32)
    assert [spans_of(llama32)(row) for row in data.train] == [["맑아요.<|eot_id|>", "雨です。<|eot_id|>"]] * 3
    # The system prompt and the date line the template writes are prompt, not answer.
    assert "Today Date" in llama32.decode(data.train[0]["input_ids"])


# Renders whole conversations only: any shorter one, as the turns' prefixes are, is refused.
WHOLE_ONLY = (
    "{% if messages|length < 5 %}{{ raise_exception('conversations of five messages only') }}{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
)


def test_a_template_that_refuses_a_turns_prefix_is_named_with_the_row(tmp_path, llama_tokenizer):
    tokenizer = with_template(llama_tokenizer, WHOLE_ONLY)
    path = jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(DataError) as e:
        prepare_data(model_section(path), tokenizer)
    assert str(e.value).startswith(
        f"{path} line 1: the chat template refuses the conversation up to message 2: conversations of "
        "five messages only; so the assistant's turns cannot be told from the rest"
    )
    assert (
        prepare_data(model_section(path, completion_only_loss=False), tokenizer).train_report.tokens.rows == 1
    )

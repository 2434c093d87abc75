"""Every format and template renders the exact expected string and masks only the response."""

from __future__ import annotations

import pytest

from training.data.formats import Example, RowError, instruction_example, messages_example, text_example
from training.data.templates import BUILTIN_TEMPLATES, parse_custom_template, tokenizer_adds_bos
from training.data.tokenization import tokenize_examples

ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# (template, input) -> (full text without BOS/EOS, response text including its leading whitespace)
CASES = {
    ("koalpaca", ""): ("<usr> 김치찌개 끓이는 법?\n<bot> 김치를 볶아요.", " 김치를 볶아요."),
    ("koalpaca", "돼지고기"): (
        "<usr> 김치찌개 끓이는 법?\n돼지고기\n<bot> 김치를 볶아요.",
        " 김치를 볶아요.",
    ),
    ("dolly-ja", ""): ("ユーザー:김치찌개 끓이는 법?\nシステム:김치를 볶아요.", "김치를 볶아요."),
    ("dolly-ja", "돼지고기"): (
        "ユーザー:김치찌개 끓이는 법?\n入力:돼지고기\nシステム:김치를 볶아요.",
        "김치를 볶아요.",
    ),
    ("alpaca", ""): (
        f"{ALPACA}\n\n### Instruction:\n김치찌개 끓이는 법?\n\n### Response:\n김치를 볶아요.",
        "\n김치를 볶아요.",
    ),
    ("alpaca", "돼지고기"): (
        f"{ALPACA_INPUT}\n\n### Instruction:\n김치찌개 끓이는 법?\n\n### Input:\n돼지고기\n\n### Response:\n김치를 볶아요.",
        "\n김치를 볶아요.",
    ),
}
ROW = {"instruction": "김치찌개 끓이는 법?", "output": "김치를 볶아요."}


def render(tokenizer, messages, template, **kwargs):
    jinja = template.chat_template(add_bos=tokenizer_adds_bos(tokenizer))
    return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, **kwargs), jinja


def masked_text(tokenizer, example: Example, jinja: str | None, completion_only=True) -> tuple[str, str]:
    dataset, stats = tokenize_examples(
        [example],
        tokenizer,
        chat_template=jinja,
        completion_only=completion_only,
        max_length=4096,
        truncates=True,
    )
    ids = dataset[0]["input_ids"]
    mask = dataset[0]["assistant_masks"] if completion_only else [1] * len(ids)
    return tokenizer.decode(ids), tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize(("name", "input_text"), list(CASES))
@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_instruction_templates_render_exactly(name, input_text, arch, llama_tokenizer, neox_tokenizer):
    tokenizer = llama_tokenizer if arch == "llama" else neox_tokenizer
    template = BUILTIN_TEMPLATES[name]
    example = instruction_example({**ROW, "input": input_text}, template)
    expected_text, expected_response = CASES[(name, input_text)]
    bos = "<s>" if arch == "llama" else ""  # Llama starts every text with BOS, GPT-NeoX never does
    text, jinja = render(tokenizer, example.messages, template)
    assert text == bos + expected_text + tokenizer.eos_token

    full, response = masked_text(tokenizer, example, jinja)
    assert full == text
    assert response == expected_response + tokenizer.eos_token

    prompt, _ = render(tokenizer, example.messages[:-1], template, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt + expected_response + tokenizer.eos_token == text


def test_custom_template_with_optional_input(llama_tokenizer):
    template = parse_custom_template("### 質問: {instruction}\n### 文脈: {input}\n### 回答: {output}")
    with_input = instruction_example({**ROW, "input": "돼지고기"}, template)
    without = instruction_example(ROW, template)
    assert render(llama_tokenizer, with_input.messages, template)[0] == (
        "<s>### 質問: 김치찌개 끓이는 법?\n### 文脈: 돼지고기\n### 回答: 김치를 볶아요.</s>"
    )
    text, jinja = render(llama_tokenizer, without.messages, template)
    assert text == "<s>### 質問: 김치찌개 끓이는 법?\n### 回答: 김치를 볶아요.</s>"
    assert masked_text(llama_tokenizer, without, jinja)[1] == " 김치를 볶아요.</s>"


def test_template_without_input_slot_rejects_rows_with_input():
    template = parse_custom_template("Q: {instruction}\nA: {output}")
    with pytest.raises(RowError, match="has no {input} slot"):
        instruction_example({**ROW, "input": "x"}, template)


def test_multi_turn_messages_mask_every_assistant_turn_and_nothing_else(llama_tokenizer):
    example = messages_example(
        {
            "messages": [
                {"role": "system", "content": "짧게 답하세요."},
                {"role": "user", "content": "안녕?"},
                {"role": "assistant", "content": "안녕하세요."},
                {"role": "user", "content": "잘 가."},
                {"role": "assistant", "content": "또 봐요."},
            ]
        },
        BUILTIN_TEMPLATES["koalpaca"],
    )
    template = BUILTIN_TEMPLATES["koalpaca"]
    text, jinja = render(llama_tokenizer, example.messages, template)
    assert (
        text
        == "<s><sys> 짧게 답하세요.\n<usr> 안녕?\n<bot> 안녕하세요.</s>\n<usr> 잘 가.\n<bot> 또 봐요.</s>"
    )
    _, response = masked_text(llama_tokenizer, example, jinja)
    assert response == " 안녕하세요.</s> 또 봐요.</s>"


def test_template_refuses_what_it_cannot_express(llama_tokenizer):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="no place for a system message"):
        render(
            llama_tokenizer,
            [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
            BUILTIN_TEMPLATES["dolly-ja"],
        )
    with pytest.raises(TemplateError, match="Unsupported role: tool"):
        render(llama_tokenizer, [{"role": "tool", "content": "x"}], BUILTIN_TEMPLATES["koalpaca"])


def test_chat_template_accepts_openai_content_parts(llama_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "안녕"}, {"type": "text", "text": "?"}]}]
    text, _ = render(llama_tokenizer, parts, BUILTIN_TEMPLATES["koalpaca"], add_generation_prompt=True)
    assert text == "<s><usr> 안녕?\n<bot>"


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_text_format_trains_on_everything_and_ends_with_eos(arch, llama_tokenizer, neox_tokenizer):
    tokenizer = llama_tokenizer if arch == "llama" else neox_tokenizer
    example = text_example({"text": "<usr> 안녕\n<bot> 반가워요"}, "text")
    full, counted = masked_text(tokenizer, example, None, completion_only=False)
    bos = "<s>" if arch == "llama" else ""
    assert full == counted == f"{bos}<usr> 안녕\n<bot> 반가워요{tokenizer.eos_token}"


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "'bot' is not one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string, got int"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "messages[1].role",
            "expected 'assistant'",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages", "must end with an assistant"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a", "name": "n"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "messages[0].name",
            "unexpected key",
        ),
    ],
)
def test_bad_message_rows_name_the_field(row, field, problem):
    with pytest.raises(RowError) as e:
        messages_example(row, BUILTIN_TEMPLATES["koalpaca"])
    assert e.value.field == field and problem in e.value.problem


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"output": "x"}, "instruction", "missing"),
        ({"instruction": "x", "output": ""}, "output", "is empty"),
        ({"instruction": "x", "output": 5}, "output", "must be a string"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "input", "must be a string"),
    ],
)
def test_bad_instruction_rows_name_the_field(row, field, problem):
    with pytest.raises(RowError) as e:
        instruction_example(row, BUILTIN_TEMPLATES["alpaca"])
    assert e.value.field == field and problem in e.value.problem

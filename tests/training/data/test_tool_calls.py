"""Tool-calling chats: OpenAI messages and LLaMA-Factory ShareGPT rows read into the same messages,
rendered only by a base model's own template that can render them, trained on the assistant's
turns (its tool calls included) and never on tool results or the tools, and a tiny run on them."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import (
    llama3_1_chat_template,
    llama3_chat_template,
    qwen2_5_chat_template,
    qwen2_5_training_chat_template,
)

from tests.conftest import cli_in_process, read_run, train_in_process
from training.data.formats import RowError, messages_example, sharegpt_example
from training.data.prepare import prepare_data
from training.data.validation import eval_data
from training.errors import DataError
from training.model.scoring import MAX_NEW_TOKENS, greedy_answers
from training.recipe import DataSection

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}
RESULT = '{"temp_c": 21, "sky": "clear"}'

# OpenAI's spelling: tools as a JSON string (as some dumps store them), content null beside the
# calls, arguments as a JSON string, the result paired with its call by id.
OPENAI_ROW = {
    "tools": json.dumps([WEATHER]),
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Seoul?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        {"role": "assistant", "content": "Clear, 21 °C."},
    ],
}
# The same chat as LLaMA-Factory writes it: bare schemas as a JSON string, the call as a
# function_call turn, the result as an observation turn, the system prompt beside the turns.
SHAREGPT_ROW = {
    "system": "Answer briefly.",
    "tools": json.dumps([WEATHER["function"]]),
    "conversations": [
        {"from": "human", "value": "Weather in Seoul?"},
        {"from": "function_call", "value": json.dumps(CALL["function"])},
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": "Clear, 21 °C."},
    ],
}
# The messages both rows stand for, as the chat template takes them.
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Seoul?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": RESULT},
    {"role": "assistant", "content": "Clear, 21 °C."},
]


def without_ids(row: dict) -> dict:
    """OPENAI_ROW without the call id, which ShareGPT rows do not have."""
    messages = json.loads(json.dumps(row["messages"]))
    del messages[2]["tool_calls"][0]["id"], messages[3]["tool_call_id"]
    return {**row, "messages": messages}


def weather_rows(n: int) -> list[dict]:
    """Tool-calling chats, every third one a plain chat without tools among them."""
    cities = ["Seoul", "Tokyo", "Osaka", "Busan", "Kyoto"]
    rows = []
    for i in range(n):
        city = cities[i % len(cities)]
        if i % 3 == 2:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Hi from {city}"},
                        {"role": "assistant", "content": "Hello!"},
                    ]
                }
            )
            continue
        rows.append(
            {
                "tools": [WEATHER],
                "messages": [
                    {"role": "user", "content": f"Weather in {city}?"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": {"city": city}},
                            }
                        ],
                    },
                    {"role": "tool", "content": json.dumps({"temp_c": 10 + i})},
                    {"role": "assistant", "content": f"{10 + i} °C in {city}."},
                ],
            }
        )
    return rows


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def with_template(tokenizer, chat_template: str):
    """A copy of the tiny test tokenizer with another chat template (its own, as a base model's)."""
    copy = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = chat_template
    return copy


@pytest.fixture(scope="module")
def qwen_tokenizer(llama_tokenizer):
    """The tiny tokenizer with Qwen2.5's chat template, as TRL ships it (TRL patches it for training)."""
    return with_template(llama_tokenizer, qwen2_5_chat_template)


def model_section(path: Path, fmt: str = "messages", **kw) -> DataSection:
    return DataSection(source=str(path), format=fmt, template="model", **kw)


def masked_spans(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    spans, span = [], []
    for token, counted in zip([*ids, None], [*mask, 0], strict=True):
        if counted:
            span.append(token)
        elif span:
            spans.append(tokenizer.decode(span))
            span = []
    return spans


def test_an_openai_tool_row_becomes_the_messages_and_tools_a_chat_template_takes():
    example = messages_example(OPENAI_ROW, None)
    calls = example.messages[2]["tool_calls"]
    assert calls == [{**CALL, "id": "call_1"}]  # arguments parsed from their JSON string
    assert example.messages[2]["content"] == "" and example.messages[3]["tool_call_id"] == "call_1"
    assert example.tools == [WEATHER]  # parsed from the JSON string
    assert example.tool_field == "messages[2].tool_calls"
    # Parallel calls, results without ids, and an assistant that calls tools again after a result.
    again = messages_example(
        {
            "messages": [
                {"role": "user", "content": "Seoul and Tokyo?"},
                {"role": "assistant", "tool_calls": [CALL, CALL]},
                {"role": "tool", "content": "21"},
                {"role": "tool", "content": "18"},
                {"role": "assistant", "content": "Let me check Osaka too.", "tool_calls": [CALL]},
                {"role": "tool", "content": "19"},
                {"role": "assistant", "content": "21, 18 and 19 °C."},
            ]
        },
        None,
    )
    assert [m["role"] for m in again.messages] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert again.tools is None and again.tool_field == "messages[1].tool_calls"
    # A plain chat with empty tools, as exports write them, has no tool part.
    plain = messages_example(
        {"tools": "", "messages": [*MESSAGES[:2], {"role": "assistant", "content": "a", "tool_calls": []}]},
        None,
    )
    assert plain.tool_field is None and plain.tools is None and "tool_calls" not in plain.messages[2]


def test_a_sharegpt_tool_row_is_the_same_example_as_its_messages_row():
    expected = messages_example(without_ids(OPENAI_ROW), None)
    assert expected.messages == MESSAGES
    example = sharegpt_example(SHAREGPT_ROW, None)
    assert example == expected and example.tool_field == "conversations[1].from"
    # Parallel calls are a JSON list; arguments may be a JSON string there too.
    parallel = {
        "from": "function_call",
        "value": json.dumps([CALL["function"], {"name": "get_time", "arguments": "{}"}]),
    }
    row = {"conversations": [SHAREGPT_ROW["conversations"][0], parallel, *SHAREGPT_ROW["conversations"][2:]]}
    calls = sharegpt_example(row, None).messages[1]["tool_calls"]
    assert calls == [CALL, {"type": "function", "function": {"name": "get_time", "arguments": {}}}]


def replaced(row: dict, index: int, turn: dict | None) -> dict:
    turns = [dict(t) for t in row["messages"]]
    if turn is None:
        del turns[index]
    else:
        turns[index] = turn
    return {**row, "messages": turns}


def call(arguments) -> dict:
    return {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}],
    }


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        (
            replaced(OPENAI_ROW, 2, call("{city: Seoul}")),
            "messages[2].tool_calls[0].function.arguments",
            "is not valid JSON",
        ),
        (
            replaced(OPENAI_ROW, 2, call("[1]")),
            "messages[2].tool_calls[0].function.arguments",
            "must be an object",
        ),
        (
            replaced(OPENAI_ROW, 2, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}),
            "messages[2].tool_calls[0].function.name",
            "missing",
        ),
        (
            replaced(OPENAI_ROW, 2, {"role": "assistant", "tool_calls": {"name": "f"}}),
            "messages[2].tool_calls",
            "must be a list of tool calls",
        ),
        (replaced(OPENAI_ROW, 2, {"role": "assistant", "content": None}), "messages[2].content", "missing"),
        (
            replaced(OPENAI_ROW, 3, {"role": "user", "content": "x"}),
            "messages[3].role",
            "expected 'tool', got 'user'",
        ),
        (replaced(OPENAI_ROW, 2, None), "messages[2].role", "expected 'assistant', got 'tool'"),
        (replaced(OPENAI_ROW, 3, {"role": "tool", "content": ""}), "messages[3].content", "is empty"),
        (
            replaced(OPENAI_ROW, 3, {"role": "tool", "content": RESULT, "tool_call_id": 1}),
            "messages[3].tool_call_id",
            "must be a string",
        ),
        (
            replaced(OPENAI_ROW, 1, {"role": "user", "content": "x", "tool_calls": []}),
            "messages[1].tool_calls",
            "unexpected key; a message with role 'user' has only role, content",
        ),
        (
            {**OPENAI_ROW, "messages": OPENAI_ROW["messages"][:4]},
            "messages",
            "must end with an assistant message",
        ),
        (
            {**OPENAI_ROW, "messages": OPENAI_ROW["messages"][:3]},
            "messages[2]",
            "the row ends with tool calls",
        ),
        ({**OPENAI_ROW, "tools": "[{"}, "tools", "is not valid JSON"),
        ({**OPENAI_ROW, "tools": [{"description": "x"}]}, "tools[0].name", "missing"),
        ({**OPENAI_ROW, "tools": {"name": "f"}}, "tools", "must be a list of function schemas"),
    ],
)
def test_bad_tool_rows_name_the_field(row, field, problem):
    with pytest.raises(RowError) as e:
        messages_example(row, None)
    assert e.value.field == field and problem in e.value.problem


@pytest.mark.parametrize(
    ("index", "turn", "field", "problem"),
    [
        (
            1,
            {"from": "function_call", "value": "get_weather(Seoul)"},
            "conversations[1].value",
            "is not valid JSON",
        ),
        (1, {"from": "function_call", "value": "[]"}, "conversations[1].value", "is an empty list of calls"),
        (
            1,
            {"from": "function_call", "value": '[{"arguments": {}}]'},
            "conversations[1].value[0].name",
            "missing",
        ),
        (
            2,
            {"from": "human", "value": "x"},
            "conversations[2].from",
            "expected 'observation' or 'tool', got 'human'",
        ),
        (
            0,
            {"from": "observation", "value": "x"},
            "conversations[0].from",
            "expected 'human' or 'user', got 'observation'",
        ),
    ],
)
def test_bad_sharegpt_tool_turns_name_the_field(index, turn, field, problem):
    turns = [dict(t) for t in SHAREGPT_ROW["conversations"]]
    turns[index] = turn
    with pytest.raises(RowError) as e:
        sharegpt_example({**SHAREGPT_ROW, "conversations": turns}, None)
    assert e.value.field == field and problem in e.value.problem


def test_a_sharegpt_tool_file_tokenizes_exactly_as_the_same_chats_in_messages(tmp_path, qwen_tokenizer):
    messages_rows = [without_ids(OPENAI_ROW), *weather_rows(8)]
    sharegpt_rows = [SHAREGPT_ROW]
    for row in messages_rows[1:]:
        turns = []
        for m in row["messages"]:
            if m.get("tool_calls"):
                turns.append({"from": "function_call", "value": json.dumps(m["tool_calls"][0]["function"])})
            else:
                turns.append(
                    {
                        "from": {"user": "human", "assistant": "gpt", "tool": "observation"}[m["role"]],
                        "value": m["content"],
                    }
                )
        sharegpt_rows.append(
            {"conversations": turns, "tools": json.dumps([t["function"] for t in row.get("tools", [])])}
        )
    as_messages = prepare_data(model_section(jsonl(tmp_path / "m.jsonl", messages_rows)), qwen_tokenizer)
    as_sharegpt = prepare_data(
        model_section(jsonl(tmp_path / "s.jsonl", sharegpt_rows), "sharegpt"), qwen_tokenizer
    )
    assert as_sharegpt.fingerprint == as_messages.fingerprint
    assert as_sharegpt.train["input_ids"] == as_messages.train["input_ids"]
    assert as_sharegpt.train["assistant_masks"] == as_messages.train["assistant_masks"]
    assert as_messages.train_report.rows_with_tools == as_sharegpt.train_report.rows_with_tools == 7


def test_completion_only_loss_counts_the_assistant_turns_and_their_calls_never_results_or_tools(
    tmp_path, qwen_tokenizer
):
    data = prepare_data(model_section(jsonl(tmp_path / "d.jsonl", [OPENAI_ROW])), qwen_tokenizer)
    ids, mask = data.train[0]["input_ids"], data.train[0]["assistant_masks"]
    tools_json = json.dumps(WEATHER)
    assert qwen_tokenizer.decode(ids) == (
        "<|im_start|>system\nAnswer briefly.\n\n# Tools\n\nYou may call one or more functions to assist with "
        "the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{tools_json}\n</tools>\n\nFor each function call, return a json object with function name "
        "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Seoul?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n'
        "</tool_call><|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nClear, 21 °C.<|im_end|>\n"
    )
    assert masked_spans(qwen_tokenizer, ids, mask) == [
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call><|im_end|>\n',
        "\nClear, 21 °C.<|im_end|>\n",
    ]
    # The saved template is the base model's own, unpatched: servers render requests as Qwen does.
    assert data.chat_template == qwen2_5_chat_template


def test_tool_rows_with_a_built_in_template_stop_before_training_even_when_bad_rows_are_skipped(
    tmp_path, llama_tokenizer
):
    path = jsonl(tmp_path / "d.jsonl", [weather_rows(3)[2], *weather_rows(2)])  # a plain chat first
    for on_bad_row in ("error", "skip"):
        cfg = DataSection(source=str(path), format="messages", template="koalpaca", on_bad_row=on_bad_row)
        with pytest.raises(DataError) as e:
            prepare_data(cfg, llama_tokenizer)
        assert str(e.value).startswith(
            f"{path} line 2: messages[1].tool_calls: tool calls, tool results and tools need"
        )
        assert "template 'koalpaca' has no place for them; use data.template: model with a base model" in str(
            e.value
        )
    # The tools alone need it too: the template would drop them.
    only_tools = jsonl(tmp_path / "t.jsonl", [{"tools": [WEATHER], **weather_rows(3)[2]}])
    with pytest.raises(
        DataError, match=rf"{only_tools} line 1: tools: tool calls, tool results and tools need"
    ):
        prepare_data(
            DataSection(source=str(only_tools), format="messages", template="alpaca"), llama_tokenizer
        )


# Qwen2.5's template without its tools preamble, and TRL's training version of it with the
# generation block around plain answers only: each renders a part of a tool chat to nothing.
NO_TOOLS_PREAMBLE = qwen2_5_chat_template.replace("{%- if tools %}", "{%- if false %}", 1)
CALLS_NOT_IN_LOSS = qwen2_5_training_chat_template.replace(
    "{%- generation %}\n        {%- if not message.tool_calls %}\n            {{- '\\n' + message.content + '<|im_end|>\\n' }}",
    "{%- if not message.tool_calls %}{%- generation %}\n            {{- '\\n' + message.content + '<|im_end|>\\n' }}{%- endgeneration %}",
).replace("{%- endif %}\n        {%- endgeneration %}", "{%- endif %}")


@pytest.mark.parametrize(
    ("chat_template", "completion_only", "problem"),
    [
        (
            llama3_chat_template,
            True,
            "the base model's chat template does not render tool calls and tool results",
        ),
        (
            NO_TOOLS_PREAMBLE,
            False,
            "the base model's chat template does not render the tools (the rows' tools field)",
        ),
        (
            CALLS_NOT_IN_LOSS,
            True,
            "the training chat template leaves the assistant's tool calls out of the loss",
        ),
    ],
)
def test_a_model_template_that_cannot_train_on_tools_stops_before_tokenizing(
    tmp_path, llama_tokenizer, chat_template, completion_only, problem
):
    # The edits took: the templates differ from TRL's where they should.
    assert "{%- if false %}" in NO_TOOLS_PREAMBLE
    assert "{%- endif %}\n        {%- endgeneration %}" not in CALLS_NOT_IN_LOSS
    assert "{%- generation %}\n        {%- if" not in CALLS_NOT_IN_LOSS
    path = jsonl(tmp_path / "d.jsonl", weather_rows(3)[::-1])
    tokenizer = with_template(llama_tokenizer, chat_template)
    with pytest.raises(DataError) as e:
        prepare_data(model_section(path, completion_only_loss=completion_only), tokenizer)
    assert str(e.value) == (
        f"{path} line 2: messages[1].tool_calls: {problem}; use data.template: model with a base model whose "
        "chat template renders tool calls and their results (Qwen2.5, Qwen3, ...)"
    )


GET_TIME = {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Seoul"}}}


@pytest.mark.parametrize(
    ("calls", "dropped"),
    [
        ([CALL, GET_TIME], "the tool call 'get_time' of message 2, so"),
        # The same call twice: its name shows, once too few times.
        (
            [CALL, CALL],
            "the tool call 'get_weather' of message 2, or of another of the 3 parts writing 'get_weather'",
        ),
    ],
)
def test_a_row_whose_tool_call_the_template_drops_stops_at_that_row(
    tmp_path, llama_tokenizer, calls, dropped
):
    # Renders the first call of a turn only: the probe (one call) passes, parallel calls would not.
    first_call_only = with_template(
        llama_tokenizer,
        qwen2_5_chat_template.replace("in message.tool_calls %}", "in message.tool_calls[:1] %}"),
    )
    parallel = replaced(OPENAI_ROW, 2, {"role": "assistant", "content": "", "tool_calls": calls})
    path = jsonl(tmp_path / "d.jsonl", [*weather_rows(2), parallel])
    with pytest.raises(DataError) as e:
        prepare_data(model_section(path, completion_only_loss=False), first_call_only)
    assert str(e.value).startswith(f"{path} line 3: the chat template renders nothing of {dropped}")
    assert "the row would train without it; use data.template: model" in str(e.value)


def test_a_row_the_template_refuses_is_named(tmp_path, llama_tokenizer):
    # Llama 3.1 renders tool calls (one per turn) and writes results as JSON strings, "{\"temp_c\": 10}".
    llama31 = with_template(llama_tokenizer, llama3_1_chat_template)
    parallel = replaced(
        without_ids(OPENAI_ROW), 2, {"role": "assistant", "content": "", "tool_calls": [CALL, GET_TIME]}
    )
    path = jsonl(tmp_path / "d.jsonl", [*weather_rows(2), parallel])
    cfg = model_section(path, completion_only_loss=False)
    with pytest.raises(DataError) as e:
        prepare_data(cfg, llama31)
    assert (
        str(e.value)
        == f"{path} line 3: the chat template refuses the row: This model only supports single tool-calls at once!"
    )
    assert prepare_data(cfg.model_copy(update={"max_rows": 2}), llama31).train_report.rows_with_tools == 2


def test_evaluation_prompts_of_tool_rows_end_with_the_results_and_keep_the_tools(tmp_path, qwen_tokenizer):
    rows = weather_rows(4)
    cfg = model_section(
        jsonl(tmp_path / "d.jsonl", rows[:1]), validation={"file": str(jsonl(tmp_path / "v.jsonl", rows))}
    )
    data = eval_data(cfg, qwen_tokenizer)
    assert data.prompts[0] == rows[0]["messages"][:-1] and data.prompts[0][-1]["role"] == "tool"
    assert data.tools == [[WEATHER], [WEATHER], None, [WEATHER]]
    assert data.references[0] == "10 °C in Seoul."


def test_answers_to_tool_prompts_are_generated_with_their_tools(tiny_dir, qwen_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama").eval()
    prompt = MESSAGES[:-1]

    def answer_to(text: str) -> str:
        ids = qwen_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
        return qwen_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    render = partial(qwen_tokenizer.apply_chat_template, prompt, tokenize=False, add_generation_prompt=True)
    with_tools, without = answer_to(render(tools=[WEATHER])), answer_to(render())
    assert with_tools != without  # else this test could not tell whether the tools were rendered
    assert greedy_answers(model, qwen_tokenizer, [prompt, prompt], [[WEATHER], None]) == [with_tools, without]


@pytest.fixture(scope="module")
def qwen_model(tiny_dir, tmp_path_factory) -> Path:
    """The tiny Llama with Qwen2.5's chat template as its own: a base model that renders tool calls."""
    folder = tmp_path_factory.mktemp("tool-model") / "tiny-qwen-template"
    shutil.copytree(tiny_dir / "llama", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = qwen2_5_chat_template
    tokenizer.save_pretrained(folder)
    return folder


def test_validate_counts_tool_rows_and_a_tiny_run_trains_on_them(tmp_path, qwen_model):
    path = jsonl(tmp_path / "tools.jsonl", [OPENAI_ROW, SHAREGPT_ROW, *weather_rows(18)])
    recipe = "recipes/quickstart-chat.yaml"
    settings = [
        f"model.name={qwen_model}",
        f"data.source={path}",
        "data.template=model",
        "data.max_length=1024",
    ]
    refused = cli_in_process("validate", "--recipe", recipe, *[a for s in settings for a in ("--set", s)])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (
        f"{path} line 2: messages: missing; the row has 'system', 'tools', 'conversations'" in refused.stderr
    )  # a ShareGPT row in a messages file

    path = jsonl(tmp_path / "tools.jsonl", [OPENAI_ROW, *weather_rows(19)])
    ok = cli_in_process("validate", "--recipe", recipe, *[a for s in settings for a in ("--set", s)])
    assert ok.returncode == 0, ok.stderr
    assert (
        f"{path}: 18 training rows, 2 validation rows (14 with tools or tool calls: train checks" in ok.stdout
    )

    run_settings = [*settings, "training.max_steps=2", "training.save_steps=1000"]
    assert train_in_process(recipe, tmp_path / "out", *run_settings) == 0
    run = read_run(tmp_path / "out" / "quickstart-chat")
    assert run["status"] == "complete"
    train, evaluation = run["data"]["train"], run["data"]["eval"]
    assert (train["rows_read"], evaluation["rows_read"]) == (18, 2)
    assert train["rows_with_tools"] + evaluation["rows_with_tools"] == 14 and train["loss_tokens"] > 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "quickstart-chat" / "adapter")
    assert saved.chat_template == qwen2_5_chat_template

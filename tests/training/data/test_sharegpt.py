"""ShareGPT rows: the same Examples as the equivalent messages rows, errors in the row's own field
names, speaker names mapped by data.roles, and a file checked by `validate` and trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_in_process, read_run, train_in_process
from training.data.formats import RowError, messages_example, sharegpt_example
from training.data.prepare import prepare_data
from training.data.templates import BUILTIN_TEMPLATES
from training.errors import DataError
from training.recipe import DataSection

KOALPACA = BUILTIN_TEMPLATES["koalpaca"]
SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(messages_row: dict, speaker: dict[str, str] = SPEAKER) -> dict:
    return {
        "conversations": [
            {"from": speaker[m["role"]], "value": m["content"]} for m in messages_row["messages"]
        ]
    }


def sharegpt_file(path: Path, *, speaker: dict[str, str] = SPEAKER) -> Path:
    """data/chat_messages.jsonl rewritten as ShareGPT rows, in the same order."""
    lines = Path("data/chat_messages.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [as_sharegpt(json.loads(line), speaker) for line in lines]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def turns(*pairs: tuple[str, object]) -> dict:
    return {"conversations": [{"from": name, "value": value} for name, value in pairs]}


def test_a_sharegpt_row_is_the_same_example_as_its_messages_row():
    messages_row = {
        "messages": [
            {"role": "system", "content": "짧게 답하세요."},
            {"role": "user", "content": "안녕?"},
            {"role": "assistant", "content": "안녕하세요."},
            {"role": "user", "content": "잘 가."},
            {"role": "assistant", "content": "또 봐요."},
        ]
    }
    expected = messages_example(messages_row, KOALPACA)
    assert sharegpt_example(as_sharegpt(messages_row), KOALPACA) == expected
    # axolotl's names (user, assistant) are taken too, and extra keys per turn (weight) are ignored.
    openai_names = as_sharegpt(messages_row, {"system": "system", "user": "user", "assistant": "assistant"})
    openai_names["conversations"][2]["weight"] = 1
    assert sharegpt_example(openai_names, KOALPACA) == expected


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"conversations": []}, "conversations", "must be a non-empty list of {from, value} objects"),
        ({"conversations": ["hi"]}, "conversations[0]", "must be an object with from and value, got str"),
        (turns(("human", "a"), ("gpt", "  ")), "conversations[1].value", "is empty"),
        (turns(("human", "a"), ("gpt", 3)), "conversations[1].value", "must be a string, got int"),
        (
            turns(("human", "a"), ("gpt", "b"), ("gpt", "c")),
            "conversations[2].from",
            "expected 'human' or 'user', got 'gpt'",
        ),
        (
            turns(("system", "s"), ("gpt", "b")),
            "conversations[1].from",
            "expected 'human' or 'user', got 'gpt'",
        ),
        (
            turns(("human", "a")),
            "conversations",
            "must end with an assistant message (from 'gpt' or 'assistant')",
        ),
        (
            {"conversations": [{"role": "user", "content": "a"}]},
            "conversations[0].from",
            "missing; a turn has from and value, this one 'role', 'content'",
        ),
    ],
)
def test_bad_sharegpt_rows_name_the_field_as_the_row_spells_it(row, field, problem):
    with pytest.raises(RowError) as e:
        sharegpt_example(row, KOALPACA)
    assert e.value.field == field and problem in e.value.problem


def test_a_system_turn_needs_a_template_with_a_system_slot():
    row = turns(("system", "s"), ("human", "a"), ("gpt", "b"))
    with pytest.raises(RowError) as e:
        sharegpt_example(row, BUILTIN_TEMPLATES["dolly-ja"])
    assert e.value.field == "conversations[0].from" and "template 'dolly-ja' has no place" in e.value.problem


def test_a_row_level_system_prompt_is_the_conversations_system_message():
    with_turn = turns(("system", "짧게 답하세요."), ("human", "안녕?"), ("gpt", "안녕하세요."))
    beside = {"system": "짧게 답하세요.", **turns(("human", "안녕?"), ("gpt", "안녕하세요."))}
    assert sharegpt_example(beside, KOALPACA) == sharegpt_example(with_turn, KOALPACA)
    # Exports write an empty one for rows without a prompt.
    empty = {**beside, "system": ""}
    assert [m["role"] for m in sharegpt_example(empty, KOALPACA).messages] == ["user", "assistant"]
    for row, template, problem in (
        ({**with_turn, "system": "s"}, KOALPACA, "a system prompt here and in conversations[0]"),
        (beside, BUILTIN_TEMPLATES["dolly-ja"], "template 'dolly-ja' has no place for one"),
        ({**beside, "system": ["s"]}, KOALPACA, "must be a string, got list"),
    ):
        with pytest.raises(RowError) as e:
            sharegpt_example(row, template)
        assert e.value.field == "system" and problem in e.value.problem


def test_an_unknown_speaker_names_the_allowed_ones_and_data_roles_maps_it():
    row = turns(("Human", "a"), ("bot", "b"))
    with pytest.raises(RowError) as e:
        sharegpt_example(row, KOALPACA)
    assert e.value.field == "conversations[0].from"
    assert e.value.problem.startswith(
        "'Human' is not one of system, human, user, gpt, assistant, function_call, observation, tool; data.roles"
    )
    example = sharegpt_example(row, KOALPACA, {"Human": "user", "bot": "assistant"})
    assert [m["role"] for m in example.messages] == ["user", "assistant"]
    # A mapped name counts as its role in the order check, and the error lists it among that role's names.
    with pytest.raises(RowError, match="expected 'gpt' or 'assistant' or 'bot', got 'Human'"):
        sharegpt_example(
            turns(("Human", "a"), ("Human", "b")), KOALPACA, {"Human": "user", "bot": "assistant"}
        )


def test_a_sharegpt_file_tokenizes_exactly_as_the_same_chats_in_messages(tmp_path, llama_tokenizer):
    path = sharegpt_file(tmp_path / "chat.jsonl")
    common = {"template": "koalpaca", "validation": 0.1}
    as_sharegpt_data = prepare_data(
        DataSection(source=str(path), format="sharegpt", **common), llama_tokenizer
    )
    as_messages = prepare_data(
        DataSection(source="data/chat_messages.jsonl", format="messages", **common), llama_tokenizer
    )
    assert as_sharegpt_data.fingerprint == as_messages.fingerprint
    assert as_sharegpt_data.train["input_ids"] == as_messages.train["input_ids"]
    assert as_sharegpt_data.train["assistant_masks"] == as_messages.train["assistant_masks"]


def test_bad_sharegpt_rows_stop_or_are_skipped_by_line(tmp_path, llama_tokenizer):
    path = sharegpt_file(tmp_path / "chat.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps(turns(("human", "a"), ("bard", "b")))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DataSection(source=str(path), format="sharegpt", template="koalpaca")
    with pytest.raises(DataError) as e:
        prepare_data(cfg, llama_tokenizer)
    assert f"{path} line 3: conversations[1].from: 'bard' is not one of" in str(e.value)
    assert "format 'sharegpt'" in str(e.value)
    skipped = prepare_data(cfg.model_copy(update={"on_bad_row": "skip"}), llama_tokenizer).train_report
    assert (skipped.rows_read, skipped.rows_skipped_bad) == (len(lines), 1)
    mapped = prepare_data(cfg.model_copy(update={"roles": {"bard": "assistant"}}), llama_tokenizer)
    assert mapped.train_report.rows_skipped_bad == 0 and mapped.train.num_rows == len(lines)


def test_validate_checks_a_sharegpt_file_and_a_tiny_run_trains_on_it(tmp_path, tiny_dir):
    path = sharegpt_file(
        tmp_path / "chat.jsonl", speaker={"system": "system", "user": "human", "assistant": "bot"}
    )
    recipe = "recipes/quickstart-chat.yaml"
    data = [f"data.source={path}", "data.format=sharegpt"]
    refused = cli_in_process("validate", "--recipe", recipe, *[a for s in data for a in ("--set", s)])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{path} line 1: conversations[2].from: 'bot' is not one of" in refused.stderr

    data.append("data.roles={bot: assistant}")
    ok = cli_in_process("validate", "--recipe", recipe, *[a for s in data for a in ("--set", s)])
    assert ok.returncode == 0, ok.stderr
    assert f"{path}: 54 training rows, 6 validation rows, all well-formed" in ok.stdout

    settings = [*data, "training.max_steps=2", "training.save_steps=1000"]
    assert train_in_process(recipe, tmp_path / "out", *settings) == 0
    run = read_run(tmp_path / "out" / "quickstart-chat")
    assert run["status"] == "complete" and run["data"]["train"]["rows_read"] == 54
    assert run["data"]["train"]["loss_tokens"] > 0


def test_a_chat_file_read_as_the_other_chat_format_says_which_format_it_is(tmp_path, llama_tokenizer):
    sharegpt = sharegpt_file(tmp_path / "chat.jsonl")
    for source, wrong, right in (
        (str(sharegpt), "messages", "sharegpt"),
        ("data/chat_messages.jsonl", "sharegpt", "messages"),
    ):
        with pytest.raises(DataError, match=rf"its turns are format {right}'s: set data.format: {right}"):
            prepare_data(DataSection(source=source, format=wrong, template="koalpaca"), llama_tokenizer)

"""Data: local files of every kind, bad rows by number, splits, truncation and wasted rows counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data.prepare import prepare_data
from training.errors import DataError
from training.recipe import DataSection

ROWS = [{"instruction": f"質問{i}", "input": "", "output": f"答え{i}"} for i in range(20)]


def jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for index, raw in (raw_lines or {}).items():
        lines[index] = raw
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def section(source: Path | str, **kw) -> DataSection:
    return DataSection(
        source=str(source),
        format=kw.pop("format", "instruction"),
        template=kw.pop("template", "dolly-ja"),
        **kw,
    )


def test_shipped_samples_prepare_in_every_format(llama_tokenizer):
    cases = [
        section("data/ja_dolly.jsonl"),
        section("data/ko_usr_bot.jsonl", format="text", template="koalpaca"),
        section("data/en_quotes.jsonl", format="text", template=None, text_field="quote"),
        section("data/chat_messages.jsonl", format="messages", template="koalpaca"),
    ]
    for cfg in cases:
        data = prepare_data(cfg, llama_tokenizer)
        report = data.train_report
        assert report.rows_read == report.tokens.rows > 0, cfg.source
        assert report.rows_skipped_bad == 0 and data.train.num_rows == report.tokens.rows
        assert 0 < report.tokens.loss_tokens <= report.tokens.tokens


def test_bad_row_stops_with_line_number_and_field(tmp_path, llama_tokenizer):
    rows = [dict(r) for r in ROWS]
    rows[6]["output"] = ""
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        prepare_data(section(path), llama_tokenizer)
    assert f"{path} line 7: output: is empty" in str(e.value)
    assert "on_bad_row: skip" in str(e.value)


def test_unparsable_json_line_is_a_bad_row(tmp_path, llama_tokenizer):
    path = jsonl(tmp_path / "d.jsonl", ROWS, raw_lines={3: '{"instruction": "x",'})
    with pytest.raises(DataError, match=r"line 4: \(row\): not valid JSON"):
        prepare_data(section(path), llama_tokenizer)


def test_skip_policy_counts_bad_rows(tmp_path, llama_tokenizer):
    rows = [dict(r) for r in ROWS]
    rows[2]["output"] = 7
    del rows[5]["instruction"]
    path = jsonl(tmp_path / "d.jsonl", rows, raw_lines={9: "not json"})
    data = prepare_data(section(path, on_bad_row="skip"), llama_tokenizer)
    report = data.train_report
    assert (report.rows_read, report.rows_skipped_bad, report.tokens.rows) == (20, 3, 17)
    assert any("line 3: output: must be a string" in b for b in report.bad_rows)
    assert any("line 6: instruction: missing" in b for b in report.bad_rows)
    assert data.report()["train"]["rows_skipped_bad"] == 3


def test_csv_json_and_parquet_sources(tmp_path, llama_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("instruction,input,output\n質問,,答え\n質問2,,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv line 3: output: is empty"):
        prepare_data(section(csv_path), llama_tokenizer)

    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps({"data": ROWS[:5]}, ensure_ascii=False), encoding="utf-8")
    assert prepare_data(section(json_path), llama_tokenizer).train_report.tokens.rows == 5

    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:4]), parquet_path)
    assert prepare_data(section(parquet_path), llama_tokenizer).train_report.tokens.rows == 4


def test_files_that_are_not_utf8_or_not_parquet_name_the_file_and_line(tmp_path, llama_tokenizer):
    # Each of these was a UnicodeDecodeError or ArrowInvalid traceback that named no row.
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in ROWS]
    lines[4] = '{"instruction": "質問", "input": "", "output": "答え"}'.encode("shift_jis")
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl line 5: \(row\): not UTF-8 text"):
        prepare_data(section(path), llama_tokenizer)
    skipped = prepare_data(section(path, on_bad_row="skip"), llama_tokenizer).train_report
    assert (skipped.rows_read, skipped.rows_skipped_bad) == (20, 1)

    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes("instruction,input,output\n質問,,答え\n".encode() + "質問2,,答え2\n".encode("cp949"))
    with pytest.raises(DataError, match=r"d.csv line 3: not UTF-8 text \(byte 0x.*save the file as UTF-8"):
        prepare_data(section(csv_path), llama_tokenizer)
    json_path = tmp_path / "d.json"
    json_path.write_bytes(json.dumps(ROWS[:3], ensure_ascii=False, indent=1).encode("euc_kr"))
    with pytest.raises(DataError, match=r"d.json line 3: not UTF-8 text"):
        prepare_data(section(json_path), llama_tokenizer)

    parquet_path = tmp_path / "d.parquet"
    parquet_path.write_text("instruction,input,output\n", encoding="utf-8")  # a CSV renamed by mistake
    with pytest.raises(DataError, match=r"d.parquet: not a readable Parquet file"):
        prepare_data(section(parquet_path), llama_tokenizer)


def test_json_lines_saved_as_json_are_read_as_json_lines(tmp_path, llama_tokenizer):
    # Many exports name JSON Lines *.json; this was "not valid JSON: Extra data at line 2 column 1".
    rows = [dict(r) for r in ROWS]
    rows[4]["output"] = " "
    path = jsonl(tmp_path / "d.json", rows)
    with pytest.raises(DataError, match=r"d.json line 5: output: is empty"):
        prepare_data(section(path), llama_tokenizer)
    assert prepare_data(section(jsonl(path, ROWS)), llama_tokenizer).train.num_rows == 20
    path.write_text('{"instruction": "質問", "output": "答え"} [', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json line 1: \(row\): not valid JSON"):
        prepare_data(section(path), llama_tokenizer)


def test_csv_row_with_more_values_than_columns_and_excel_bom(tmp_path, llama_tokenizer):
    # An unquoted comma shifted the row's values: it trained on the wrong columns, silently.
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("instruction,input,output\n質問,,答え\n質問, 続き,,答え\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv line 3: \(row\): 4 values, but the header has 3 columns"):
        prepare_data(section(csv_path), llama_tokenizer)
    # Excel's "CSV UTF-8" starts with a byte-order mark: the first column is still "instruction".
    csv_path.write_text("instruction,input,output\n質問,,答え\n質問2,,答え2\n", encoding="utf-8-sig")
    assert prepare_data(section(csv_path), llama_tokenizer).train_report.tokens.rows == 2


def test_csv_rows_with_line_breaks_in_cells_are_named_by_their_first_line(tmp_path, llama_tokenizer):
    # The csv module's line_num is the row's last line: a row starting on line 3 was "line 5".
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(
        'instruction,input,output\r\n質問,,答え\r\n"",,"一行目\n二行目\n三行目"\r\n\r\n質問3,,""\r\n',
        encoding="utf-8-sig",
    )
    data = prepare_data(section(csv_path, on_bad_row="skip"), llama_tokenizer).train_report
    assert data.bad_rows == [
        f"{csv_path} line 3: instruction: is empty",
        f"{csv_path} line 7: output: is empty",
    ]


def test_columns_are_renamed(tmp_path, llama_tokenizer):
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in ROWS]
    path = jsonl(tmp_path / "d.jsonl", rows)
    cfg = section(path, columns={"question": "instruction", "answer": "output"})
    assert prepare_data(cfg, llama_tokenizer).train_report.tokens.rows == 20


def test_system_message_under_a_template_without_one_is_a_bad_row(tmp_path, llama_tokenizer):
    # dolly-ja and custom templates have no system slot: their chat template raised a bare jinja
    # TemplateError while the whole file was tokenized, naming no file, row or field.
    chat = [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"}]
    rows = [{"messages": chat} for _ in range(10)]
    rows[3] = {"messages": [{"role": "system", "content": "丁寧に答えてください。"}, *chat]}
    path = jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as e:
        prepare_data(section(path, format="messages"), llama_tokenizer)
    message = str(e.value)
    assert f"{path} line 4: messages[0].role: a system message, but template 'dolly-ja'" in message
    assert "koalpaca, alpaca or model" in message
    skipped = prepare_data(section(path, format="messages", on_bad_row="skip"), llama_tokenizer)
    assert (skipped.train_report.rows_skipped_bad, skipped.train_report.tokens.rows) == (1, 9)
    with_slot = prepare_data(section(path, format="messages", template="koalpaca"), llama_tokenizer)
    assert with_slot.train.num_rows == 10


def test_missing_field_names_the_fields_the_row_has(tmp_path, llama_tokenizer):
    # A spreadsheet with its own headers said only "instruction: missing", not what the row holds
    # nor that data.columns maps them.
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("질문,맥락,답변\n한국의 수도는?,,서울입니다.\n", encoding="utf-8-sig")
    with pytest.raises(DataError) as e:
        prepare_data(section(csv_path), llama_tokenizer)
    assert (
        f"{csv_path} line 2: instruction: missing; the row has '질문', '맥락', '답변' "
        "(data.columns renames fields, e.g. {질문: instruction})"
    ) in str(e.value)
    renamed = section(csv_path, columns={"질문": "instruction", "맥락": "input", "답변": "output"})
    assert prepare_data(renamed, llama_tokenizer).train.num_rows == 1


def test_split_expressions_on_local_files(tmp_path, llama_tokenizer):
    path = jsonl(tmp_path / "d.jsonl", ROWS)
    assert prepare_data(section(path, split="train[:25%]"), llama_tokenizer).train.num_rows == 5
    assert prepare_data(section(path, split="train[10:13]"), llama_tokenizer).train.num_rows == 3
    assert prepare_data(section(path, max_rows=4), llama_tokenizer).train.num_rows == 4
    with pytest.raises(DataError, match="split 'test' is not a valid split expression for a local file"):
        prepare_data(section(path, split="test"), llama_tokenizer)


def test_validation_by_fraction_and_by_file(tmp_path, llama_tokenizer):
    path = jsonl(tmp_path / "d.jsonl", ROWS)
    data = prepare_data(section(path, validation=0.25), llama_tokenizer)
    assert (data.train.num_rows, data.eval.num_rows) == (15, 5)
    again = prepare_data(section(path, validation=0.25), llama_tokenizer)
    assert again.fingerprint == data.fingerprint  # the same rows land in the same split every time

    val = jsonl(tmp_path / "v.jsonl", ROWS[:3])
    data = prepare_data(section(path, validation={"file": str(val)}), llama_tokenizer)
    assert (data.train.num_rows, data.eval.num_rows) == (20, 3)
    with pytest.raises(DataError, match="need at least one row in each split"):
        prepare_data(section(jsonl(tmp_path / "one.jsonl", ROWS[:1]), validation=0.5), llama_tokenizer)


def test_truncation_counted_and_fully_truncated_responses_dropped(tmp_path, llama_tokenizer):
    rows = [dict(r) for r in ROWS]
    rows[0]["instruction"] = "長い質問 " * 200  # its response starts beyond max_length
    rows[1]["output"] = "長い答え " * 200  # truncated, but part of the response remains
    path = jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(section(path, max_length=64), llama_tokenizer)
    stats = data.train_report.tokens
    assert stats.rows_dropped_no_loss == 1 and stats.rows == 19
    assert stats.rows_over_max_length == 1  # row 1; row 0 was dropped, not kept
    assert all(sum(m[1:64]) > 0 for m in data.train["assistant_masks"])


def test_too_many_wasted_rows_stop_before_training(tmp_path, llama_tokenizer):
    rows = [{**r, "instruction": "長い質問 " * 200} for r in ROWS[:5]] + ROWS[5:]
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        prepare_data(section(path, max_length=64), llama_tokenizer)
    message = str(e.value)
    assert "5 of 20 training rows (25%) have no response token within data.max_length=64" in message
    assert "Raise data.max_length" in message
    ok = prepare_data(section(path, max_length=64, max_dropped_fraction=0.5), llama_tokenizer)
    assert ok.train_report.tokens.rows_dropped_no_loss == 5


def test_packing_split_strategies_do_not_truncate(tmp_path, llama_tokenizer):
    rows = [{**r, "instruction": "長い質問 " * 200} for r in ROWS[:5]] + ROWS[5:]
    path = jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(section(path, max_length=64, packing=True), llama_tokenizer, truncates=False)
    assert data.train_report.tokens.rows_dropped_no_loss == 0


def test_model_template_needs_a_chat_template(tmp_path, llama_tokenizer):
    path = jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="base tokenizer has no chat template"):
        prepare_data(section(path, template="model"), llama_tokenizer)


def test_missing_file_and_unreachable_hub(tmp_path, llama_tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        prepare_data(section(tmp_path / "missing.jsonl"), llama_tokenizer)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare_data(section(tmp_path / "d.txt"), llama_tokenizer)
    with pytest.raises(DataError, match="could not load dataset 'someone/no-such-dataset'"):
        prepare_data(section("someone/no-such-dataset"), llama_tokenizer)

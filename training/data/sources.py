"""Read dataset rows from local files or the Hugging Face Hub, keeping where each row came from.

Local JSON Lines, JSON and CSV are parsed here rather than through `datasets`, because
pyarrow's schema inference fails on a wrongly typed row with a message that names no
row; parsing row by row lets a bad row be reported (or skipped) by its line number. They are
UTF-8 unless data.encoding names another encoding (training.data.encodings). Parquet is typed
already and hub datasets come through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ReadInstruction

from training.data.encodings import codec_for, encoding_advice, encoding_label, misread
from training.errors import DataError

LOCAL_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclass
class SourceRow:
    where: str  # "data/x.jsonl line 12", used in every message about this row
    value: Any  # the parsed row (normally a dict)
    parse_error: str | None = None  # set when the row could not even be parsed


def is_local(source: str) -> bool:
    path = Path(source)
    return path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/"))


def read_rows(
    source: str,
    *,
    split: str = "train",
    subset: str | None = None,
    revision: str | None = None,
    max_rows: int | None = None,
    encoding: str | None = None,
    encoding_key: str = "data.encoding",
) -> list[SourceRow]:
    """The rows of `source`; `encoding` is the text encoding of a JSON or CSV file, None for UTF-8, and
    `encoding_key` the recipe key it comes from, for messages."""
    if is_local(source):
        rows = _read_local(Path(source), encoding, encoding_key)
        rows = _apply_split(rows, split, source)
    else:
        rows = _read_hub(source, split=split, subset=subset, revision=revision, encoding=encoding)
    return rows[:max_rows] if max_rows else rows


def _read_local(path: Path, encoding: str | None, key: str) -> list[SourceRow]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(sorted(LOCAL_SUFFIXES))}")
    if kind == "parquet":
        return _read_parquet(path)  # text in Parquet is UTF-8 by its specification
    data = path.read_bytes()  # once: the encoding check and the reader share it
    if encoding is not None and (problem := misread(data, encoding, key)):
        raise DataError(f"{path}: {problem}")
    if kind == "jsonl":
        return _read_jsonl(path, data, encoding, key)
    if kind == "json":
        return _read_json(path, data, encoding, key)
    return _read_csv(path, data, encoding, key)


def _read_jsonl(path: Path, data: bytes, encoding: str | None, key: str) -> list[SourceRow]:
    codec = codec_for(encoding)
    rows = []
    undecodable: list[bytes] = []
    first_undecodable: SourceRow | None = None
    # Split as bytes and decoded line by line: a line that is not text in the file's encoding (one row
    # pasted from a Shift-JIS or CP949 file) is then a bad row by its number, like a line that is not JSON.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            line = raw.decode(codec)
        except UnicodeDecodeError as e:
            at = f"byte {raw[e.start]:#04x} at byte {e.start + 1} of the line"
            rows.append(SourceRow(where, None, f"not {encoding_label(encoding)} text ({at})"))
            undecodable.append(raw)
            first_undecodable = first_undecodable or rows[-1]
            continue
        try:
            rows.append(SourceRow(where, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append(SourceRow(where, None, f"not valid JSON ({e.msg} at column {e.colno})"))
    if first_undecodable is not None:
        # Said once, on the first such row (the one an error stops at): the lines that do not decode,
        # taken together, are the best evidence of what they are.
        first_undecodable.parse_error += "; " + encoding_advice(b"".join(undecodable), encoding, key)
    return rows


def _text(path: Path, data: bytes, encoding: str | None, key: str) -> str:
    """The file's `data` as text; data that does not decode is a DataError naming the line and what to do."""
    try:
        return data.decode(codec_for(encoding))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path} line {line}: not {encoding_label(encoding)} text (byte {data[e.start]:#04x}); "
            + encoding_advice(data, encoding, key)
        ) from None


def _read_json(path: Path, data: bytes, encoding: str | None, key: str) -> list[SourceRow]:
    try:
        parsed = json.loads(_text(path, data, encoding, key))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json, which `datasets` reads too
            return _read_jsonl(path, data, encoding, key)
        raise DataError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(parsed, dict) and len(parsed) == 1 and isinstance(next(iter(parsed.values())), list):
        parsed = next(iter(parsed.values()))  # {"data": [...]} style exports
    if not isinstance(parsed, list):
        raise DataError(f"{path}: expected a JSON list of objects (or use JSON Lines, one object per line)")
    return [SourceRow(f"{path} item {i}", row) for i, row in enumerate(parsed, start=1)]


def _read_csv(path: Path, data: bytes, encoding: str | None, key: str) -> list[SourceRow]:
    reader = csv.reader(io.StringIO(_text(path, data, encoding, key), newline=""))
    header = next(reader, [])
    rows = []
    first = reader.line_num + 1
    for values in reader:
        # Line numbers count the header as line 1. A quoted value may span lines (a spreadsheet cell
        # with line breaks): the row is named by its first line, where it starts, not by its last.
        where = f"{path} line {first}"
        first = reader.line_num + 1
        if not values:  # a blank line
            continue
        if len(values) > len(header):
            # An unquoted comma in a value: every column after it would be shifted by one.
            problem = f"{len(values)} values, but the header has {len(header)} columns (quote values that hold commas)"
            rows.append(SourceRow(where, None, problem))
        else:
            # Values left off at the end stay None (missing), as csv.DictReader leaves them.
            row = dict.fromkeys(header)
            row.update(zip(header, values, strict=False))
            rows.append(SourceRow(where, row))
    return rows


def _read_parquet(path: Path) -> list[SourceRow]:
    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:  # ArrowInvalid for a file that is not Parquet, or a damaged one
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    return [SourceRow(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _apply_split(rows: list[SourceRow], split: str, source: str) -> list[SourceRow]:
    """Honour split expressions like train[:10%] on a local file (which is all 'train')."""
    if split == "train":
        return rows

    try:
        instruction = ReadInstruction.from_spec(split)
        (absolute,) = instruction.to_absolute({"train": len(rows)})
    except (ValueError, KeyError, AssertionError) as e:
        raise DataError(
            f"{source}: split {split!r} is not a valid split expression for a local file; use "
            f"'train', 'train[:100]' or 'train[10%:20%]' ({e})"
        ) from None
    return rows[absolute.from_ : absolute.to]


def _read_hub(
    source: str, *, split: str, subset: str | None, revision: str | None, encoding: str | None
) -> list[SourceRow]:
    # `datasets` decodes CSV and JSON files with the encoding it is given; its Parquet and Arrow readers
    # take none, so it is passed only when the recipe sets one.
    options = {"encoding": encoding} if encoding is not None else {}
    try:
        ds = datasets.load_dataset(source, name=subset, split=split, revision=revision, **options)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "could not load"
        if encoding is not None and "'encoding'" in str(e):
            raise DataError(
                f"{source}: data.encoding ({encoding}) applies to CSV and JSON files, and this dataset's "
                "files are Parquet or Arrow, whose text is UTF-8 by specification; remove data.encoding"
            ) from None
        raise DataError(
            f"could not load dataset {source!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}\n"
            "Check the name and split, your network and HF_TOKEN for gated datasets, "
            "or point data.source at a local .jsonl/.json/.csv/.parquet file."
        ) from None
    return [SourceRow(f"{source}[{split}] row {i}", row) for i, row in enumerate(ds, start=1)]

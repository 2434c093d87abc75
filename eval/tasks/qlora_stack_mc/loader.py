"""The rows of qlora_stack_mc, read from the JSON Lines file beside this module."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

ROWS = Path(__file__).with_name("qlora_stack_mc.jsonl")


def load_rows(**_task_settings) -> datasets.DatasetDict:
    # lm-eval passes the task's metadata and dataset_kwargs; the rows depend on neither.
    rows = [json.loads(line) for line in ROWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

"""The Example: one row of data, checked and converted, as it is tokenized and trained on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict] | None = None  # function schemas, passed to the chat template as tools=
    # Not what is trained on (the same chat read from two files is the same example), but named in
    # the errors only rendering the row finds.
    where: str = field(default="(row)", compare=False)  # the row's place, e.g. "chat.jsonl line 3"
    tool_field: str | None = field(default=None, compare=False)  # its first tool part; None: none

    def as_json(self) -> Any:
        if self.messages is None:
            return {"text": self.text}
        return {"messages": self.messages, "tools": self.tools} if self.tools else {"messages": self.messages}

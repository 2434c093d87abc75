"""The names of the tiny offline models (tiny://llama, ...), apart from training.model.tiny,
which builds them with torch and transformers: `python -m training tiny-model` checks --arch and
prints its help without them (training/cli/__init__.py says why)."""

from __future__ import annotations

SCHEME = "tiny://"
ARCHITECTURES = ("llama", "llama-tied", "gpt-neox", "qwen2", "llama3")

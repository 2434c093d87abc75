"""A merged model directory as the servers see it: architecture, context length, dtype, chat template.

outputs/<run>/merged/ is a standard Hugging Face model directory plus merge.json, the merge
step's record, which carries the recipe. The recipe's data.max_length is the longest
sequence the model was fine-tuned on; the servers use it as their per-request limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.errors import ServingError

# config.json names for the longest position the model was pre-trained for, by family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


class ModelDirError(ServingError):
    """The directory is not a servable merged model; the message says what is missing."""


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent; unreadable JSON is an error naming the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read it as JSON ({e})") from None
    return data if isinstance(data, dict) else None


def trained_max_length(adapter: Path) -> int | None:
    """The data.max_length an adapter's recipe trained on (its run.json), if it says."""
    recipe = (read_json(adapter / "run.json") or {}).get("recipe") or {}
    length = (recipe.get("data") or {}).get("max_length")
    return length if isinstance(length, int) and length > 0 else None


def read_chat_template(path: Path) -> str | None:
    """The chat template a tokenizer saved in `path` carries (a model's or an adapter's), as transformers
    loads it: chat_template.jinja before tokenizer_config.json's chat_template (a string, or named
    templates of which "default" is the one used)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = (read_json(path / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


@dataclass(frozen=True)
class ModelDir:
    path: Path
    config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    record: dict[str, Any] | None
    record_path: Path | None

    @classmethod
    def open(cls, path: str | Path) -> ModelDir:
        path = Path(path)
        if not path.is_dir():
            raise ModelDirError(
                f"{path}: no such directory. Merge the run first (make merge), or pass the directory "
                "of a merged model (config.json + *.safetensors + tokenizer)."
            )
        config = read_json(path / "config.json")
        if config is None:
            hint = (
                " It holds an adapter (adapter_config.json): merge it first (make merge)."
                if (path / "adapter_config.json").is_file()
                else ""
            )
            raise ModelDirError(f"{path}: no config.json, so this is not a model directory.{hint}")
        if not any(path.glob("*.safetensors")):
            found = sorted(p.name for p in path.glob("*.bin"))[:3]
            raise ModelDirError(
                f"{path}: no *.safetensors weights{' (found ' + ', '.join(found) + ')' if found else ''}. "
                "The servers load safetensors only; save with safe_serialization (the merge step does)."
            )
        record, record_path = None, None
        for candidate in (
            path / "merge.json",
            path.parent / "run.json",
            path.parent / "adapter" / "run.json",
        ):
            record = read_json(candidate)
            if record is not None:
                record_path = candidate
                break
        return cls(path, config, read_json(path / "tokenizer_config.json") or {}, record, record_path)

    @property
    def run_name(self) -> str:
        """The name clients use for this model: the run's name (outputs/<run>/merged)."""
        if self.path.name == "merged":
            return self.path.parent.name
        if self.record:
            name = self.record.get("run_name") or (self.record.get("recipe") or {}).get("output", {}).get(
                "run_name"
            )
            if name:
                return str(name)
        return self.path.name

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["unknown"]
        return str(archs[0])

    @property
    def dtype(self) -> str | None:
        value = self.config.get("dtype") or self.config.get("torch_dtype")
        return str(value).removeprefix("torch.") if value else None

    @property
    def max_position_embeddings(self) -> int | None:
        for key in POSITION_KEYS:
            value = self.config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def recipe_max_length(self) -> int | None:
        if not self.record:
            return None
        recipe = self.record.get("recipe") or {}
        for section in (recipe.get("data"), self.record.get("data")):
            if isinstance(section, dict) and isinstance(section.get("max_length"), int):
                return section["max_length"]
        return None

    def context_length(
        self, override: int | None = None, trained: tuple[int, str] | None = None
    ) -> tuple[int, str]:
        """Tokens per request (prompt + new tokens), and where that number comes from. `trained`:
        (max_length, where) the rows were trained with, when not this model's own recipe (adapters)."""
        positions = self.max_position_embeddings
        if override is not None:
            if positions is not None and override > positions:
                raise ModelDirError(
                    f"{self.path}: {override} tokens per request is more than the model's "
                    f"{positions} positions ({self.architecture}); use at most {positions}"
                )
            return override, "set explicitly"
        if trained is None and self.recipe_max_length is not None:
            trained = (self.recipe_max_length, f"the recipe's data.max_length ({self.record_path.name})")
        if trained is not None:
            length, where = trained
            if positions is not None and length > positions:
                return positions, f"the model's max_position_embeddings (below {where}: {length})"
            return length, where
        if positions is not None:
            return positions, "the model's max_position_embeddings (no merge.json with the recipe)"
        raise ModelDirError(
            f"{self.path}: cannot tell the context length (no merge.json recipe and no "
            f"{' / '.join(POSITION_KEYS)} in config.json); pass it explicitly"
        )

    @property
    def attention_heads(self) -> tuple[int | None, int | None]:
        heads = self.config.get("num_attention_heads") or self.config.get("n_head")
        kv = self.config.get("num_key_value_heads") or heads
        return heads, kv

    @property
    def head_dim(self) -> int | None:
        """Width of one attention head: config.json's head_dim, else hidden size / attention heads."""
        explicit = self.config.get("head_dim")
        if isinstance(explicit, int) and explicit > 0:
            return explicit
        hidden = self.config.get("hidden_size") or self.config.get("n_embd")
        heads, _ = self.attention_heads
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
            return hidden // heads
        return None

    @property
    def num_layers(self) -> int | None:
        value = self.config.get("num_hidden_layers") or self.config.get("n_layer")
        return value if isinstance(value, int) and value > 0 else None

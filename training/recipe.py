"""The recipe: one YAML file that describes a whole run, validated before anything loads.

Sections: model, quantization, lora, data, training (passed to TRL's SFTConfig),
distributed, output, merge, eval. Unknown keys, wrong types and impossible combinations raise a
RecipeError that names the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from training.data.encodings import EXAMPLES as ENCODING_EXAMPLES
from training.data.encodings import check_encoding
from training.data.formats import FORMATS, RESPONSE_FORMATS, ROLES, row_format
from training.data.templates import MODEL_TEMPLATE, resolve_template
from training.errors import RecipeError

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(description="Hub id (org/name), local directory, or tiny://llama | tiny://gpt-neox")
    revision: str | None = None
    dtype: Dtype = Field(
        "auto",
        description="Compute dtype and dtype of the non-quantized weights. auto: bf16 where the GPU "
        "supports it, else fp16; fp32 on the CPU.",
    )
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"


class QuantizationSection(_Section):
    method: Literal["nf4", "fp4", "int8", "none", "gptq"] = Field(
        "nf4",
        description="nf4/fp4: bitsandbytes 4-bit (nf4 + double quant = QLoRA); int8: bitsandbytes "
        "LLM.int8; none: plain LoRA on full-precision weights; gptq: the checkpoint is already "
        "GPTQ-quantized (needs CUDA GPTQ kernels).",
    )
    double_quant: bool = True


class LoraSection(_Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: str | list[str] = Field(
        "auto", description="auto (by architecture), all-linear, or a list of module names"
    )
    include_mlp: bool = Field(False, description="With target_modules: auto, also adapt the MLP projections")
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _known_keyword(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v not in ("auto", "all-linear"):
            raise ValueError(f"must be 'auto', 'all-linear' or a list of module names, not {v!r}")
        if isinstance(v, list) and not v:
            raise ValueError("the list of target modules is empty")
        return v

    @model_validator(mode="after")
    def _mlp_only_with_auto(self) -> LoraSection:
        if self.include_mlp and self.target_modules != "auto":
            raise ValueError("include_mlp only applies to target_modules: auto")
        return self


def _checked_encoding(encoding: str | None, path: str | None, key: str) -> str | None:
    if encoding is None:
        return encoding
    if str(path or "").lower().endswith(".parquet"):
        raise ValueError(
            f"applies to .jsonl/.json/.csv files; text in Parquet is UTF-8 by its specification, so remove {key}"
        )
    return check_encoding(encoding)  # raises ValueError naming what is allowed


class ValidationSplit(_Section):
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    file: str | None = None
    split: str | None = Field(None, description="A split expression of the same hub dataset, e.g. test[:500]")
    encoding: str | None = Field(
        None,
        description="Text encoding of validation.file, where it differs from data.encoding (the default): "
        "a file from elsewhere",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _checked_encoding(v, info.data.get("file"), "data.validation.encoding")

    @model_validator(mode="after")
    def _exactly_one(self) -> ValidationSplit:
        given = [k for k in ("fraction", "file", "split") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of fraction, file or split")
        return self

    @model_validator(mode="after")
    def _encoding_of_a_file(self) -> ValidationSplit:
        if self.encoding is not None and self.file is None:
            split = "fraction" if self.fraction is not None else "split"
            raise ValueError(
                f"encoding applies to validation.file; a {split} of data.source is read with data.encoding"
            )
        return self


class DataSection(_Section):
    source: str = Field(description="Local .jsonl/.json/.csv/.parquet file, or a hub dataset id")
    format: str = Field(description=f"{', '.join(FORMATS)} (training.data.formats)")
    template: str | None = Field(
        None,
        description="Built-in template name (koalpaca, dolly-ja, alpaca), 'model' (the base "
        "tokenizer's own chat template), or a custom string with {instruction}, optional {input} "
        "and {output}",
    )
    text_field: str = "text"
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename source columns, e.g. {question: instruction}"
    )
    roles: dict[str, Literal[ROLES]] = Field(
        default_factory=dict,
        description="Format sharegpt: more speaker names (conversations[].from) and their roles, "
        "e.g. {bot: assistant}",
    )
    subset: str | None = Field(None, description="Hub dataset configuration name")
    revision: str | None = None
    split: str = "train"
    encoding: str | None = Field(
        None,
        description="Text encoding of a .jsonl/.json/.csv file (data.source, and validation.file unless "
        f"validation.encoding is given), a Python codec name: {ENCODING_EXAMPLES} (cp949 Korean, cp932 "
        "Japanese, gb18030 Simplified Chinese, cp950 Traditional Chinese: what Excel writes on Windows in that "
        "language; euc-jp: older Japanese Unix exports). Default: UTF-8, with or without a byte-order mark. "
        "Passed to `datasets` for a hub dataset of CSV or JSON files",
    )
    validation: ValidationSplit | None = None
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows (smoke runs)")
    max_length: int = Field(1024, gt=0)
    packing: bool = False
    completion_only_loss: bool | None = Field(
        None,
        description=f"Loss on response tokens only. Default: on for {', '.join(RESPONSE_FORMATS)}",
    )
    on_bad_row: Literal["error", "skip"] = "error"
    max_dropped_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Stop before training when more than this fraction of rows has no token left "
        "that counts toward the loss (response cut away by truncation)",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        row_format(v)  # raises ValueError naming what is allowed
        return v

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        if v is not None:
            resolve_template(v)  # raises ValueError naming what is allowed
        return v

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _checked_encoding(v, info.data.get("source"), "data.encoding")

    @field_validator("validation", mode="before")
    @classmethod
    def _fraction_shorthand(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {"fraction": v}
        if isinstance(v, str):  # `--set data.validation=0.1.5`, or a file name written bare
            raise ValueError(
                "give a fraction between 0 and 1 (0.1), {file: path.jsonl}, {split: 'test[:500]'} "
                "(a hub dataset's own split), or null"
            )
        return v

    @model_validator(mode="after")
    def _combinations(self) -> DataSection:
        has_response = row_format(self.format).has_response
        if not has_response and self.completion_only_loss:
            raise ValueError(
                f"completion_only_loss needs a prompt/response split, which format '{self.format}' does not "
                f"have; use format {' or '.join(map(repr, RESPONSE_FORMATS))}, or set completion_only_loss: false"
            )
        if has_response and self.template is None:
            raise ValueError(
                f"format '{self.format}' needs a template: koalpaca, dolly-ja, alpaca, model, or a "
                "custom string such as '### Q: {instruction}\\n### A: {output}'"
            )
        if self.template == MODEL_TEMPLATE and not has_response:
            raise ValueError(f"template 'model' only applies to formats {', '.join(RESPONSE_FORMATS)}")
        if self.roles and self.format != "sharegpt":
            raise ValueError(
                f"roles names the speakers of format sharegpt (conversations[].from); format '{self.format}' "
                "has none"
            )
        return self

    @property
    def loss_on_completion_only(self) -> bool:
        if self.completion_only_loss is None:
            return row_format(self.format).has_response
        return self.completion_only_loss


class OutputSection(_Section):
    dir: str = "outputs"
    run_name: str = Field("", description="Defaults to the recipe file's name")

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if v and (Path(v).name != v or v.startswith(".")):
            raise ValueError("must be a plain directory name (no '/', not starting with '.')")
        return v

    def run_dir(self) -> Path:
        return Path(self.dir) / self.run_name


# Sizes of the merged model's weight files. huggingface_hub's own parser (what save_pretrained
# uses) knows only KB, MB, GB and TB, and failed with a traceback on the binary units and on B.
SHARD_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
SHARD_SIZE_PATTERN = rf"^(\d+(?:\.\d+)?)\s*({'|'.join(SHARD_SIZE_UNITS)})$"


def shard_size_bytes(size: str) -> int:
    """'2GB' (10^9 bytes), '500MiB', ... -> bytes; ValueError naming what is allowed."""
    match = re.match(SHARD_SIZE_PATTERN, size.strip())
    if not match or float(match[1]) <= 0:
        raise ValueError(f"give a size above 0 in {', '.join(SHARD_SIZE_UNITS)}, e.g. 2GB, 500MB or 4GiB")
    return int(float(match[1]) * SHARD_SIZE_UNITS[match[2]])


class MergeSection(_Section):
    base: Literal["original", "nf4-roundtrip", "auto"] = Field(
        "original",
        description="Fold the adapter into the original weights, into their NF4 round trip (what the 4-bit "
        "layers computed with in training), or pick the one with the lower validation perplexity",
    )
    dtype: Dtype = Field("auto", description="auto: the base model's own dtype")
    max_shard_size: str = "2GB"
    verify: Literal["streamed", "full", "off"] = Field(
        "streamed",
        description="Compare the merged model's logits with base + adapter on probe prompts: one decoder "
        "layer in memory at a time (streamed), both models loaded whole, plus greedy generation and the "
        "4-bit layers themselves for an NF4 round-trip base (full), or not at all (off). true and false "
        "mean streamed and off",
    )
    strategy: Literal["auto", "streaming", "peft"] = Field(
        "auto", description="auto: streaming unless the adapter needs peft's merge_and_unload"
    )

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        shard_size_bytes(value)  # raises ValueError naming what is allowed
        return value

    @field_validator("verify", mode="before")
    @classmethod
    def _verify_from_bool(cls, value):
        # Recipes (and the run.json of earlier runs) wrote true/false before there were two checks.
        if isinstance(value, bool):
            return "streamed" if value else "off"
        return value


class EvalSection(_Section):
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks, groups or patterns that `python -m training eval` runs by "
        "default (e.g. kobest, kobest_*, qlora_stack_mc); --tasks overrides them",
    )
    limit: float | None = Field(
        None,
        gt=0,
        description="Score only this many documents per task (a fraction below 1 is a share); for quick runs",
    )

    @field_validator("tasks")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t.strip() or "," in t]
        if bad:
            raise ValueError(f"task names must be non-empty and one per list item, got {bad!r}")
        return v


class FsdpSection(_Section):
    cpu_offload: bool = Field(
        False,
        description="Keep the sharded weights, gradients and optimizer states in CPU memory between uses: "
        "less GPU memory, slower steps",
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free each layer's gathered weights after its forward and gather them again for the "
        "backward: less memory; false keeps them, one all-gather fewer per layer",
    )


class DeepSpeedSection(_Section):
    config: str = Field(
        "zero2",
        description="zero2 or zero3 (the configs shipped in recipes/deepspeed/), or the path of a DeepSpeed "
        "JSON config",
    )


class DistributedSection(_Section):
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none",
        description="none: one process; ddp: a whole copy of the 4-bit model per GPU, data split across "
        "them; fsdp: weights, gradients and optimizer states sharded across GPUs (FSDP2); deepspeed: ZeRO "
        "sharding as distributed.deepspeed.config says. Processes and machines come from the command line.",
    )
    fsdp: FsdpSection = Field(default_factory=FsdpSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)

    @model_validator(mode="after")
    def _settings_of_the_chosen_strategy(self) -> DistributedSection:
        for name in ("fsdp", "deepspeed"):
            settings = getattr(self, name)
            if self.strategy != name and settings != type(settings)():
                raise ValueError(
                    f"distributed.{name} settings apply only with strategy: {name} (strategy is {self.strategy})"
                )
        return self


class Recipe(_Section):
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: dict[str, Any] = Field(default_factory=dict, description="Passed to TRL's SFTConfig")
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    output: OutputSection = Field(default_factory=OutputSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        q = self.quantization.method
        if q == "gptq" and self.lora.use_dora:
            raise ValueError("lora.use_dora is not supported on GPTQ-quantized models")
        if self.distributed.strategy == "fsdp" and q in ("int8", "gptq"):
            raise ValueError(
                f"distributed.strategy fsdp cannot shard {q} weights (FSDP shards only floating-point "
                "storage); use quantization.method nf4 (4-bit weights stored as the compute dtype), or "
                "strategy ddp"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------
# Loading


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["training.max_steps=5", "lora.r=8"] into a nested dict; values are YAML scalars."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {pair!r}: expected key.path=value, e.g. --set training.max_steps=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. a template string): take it as written
        if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
            value = raw  # "Q: {instruction}" is a string to a user, a mapping only to YAML
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {pair!r}: {part} is set to a value and also used as a section")
        node[parts[-1]] = value
    return result


def deep_merge(base: dict[str, Any], overrides: dict[str, Any], _path: str = "") -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        here = f"{_path}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, here + ".")
        elif isinstance(value, dict) and key in merged and merged[key] is not None:
            raise RecipeError(f"--set {here}.…: {here} is a value in the recipe, not a section")
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(
            f"{path}: is a directory, not a recipe file; give a YAML file such as recipes/quickstart.yaml"
        )
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:  # a recipe saved as Shift-JIS/CP949, or a binary file given by mistake
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save the recipe as UTF-8"
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of sections, got {type(raw).__name__}")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict) and not raw["output"].get("run_name"):
        raw["output"]["run_name"] = path.stem
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_validation_error(source, e)) from None


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid recipe"]
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            msg = f"unknown key; allowed: {', '.join(allowed)}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if not isinstance(err.get("input"), (dict, list)) and "input" in err:
                msg += f" (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)

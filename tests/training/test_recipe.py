"""Recipes: every kind of mistake fails before anything loads, naming the file, key and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_in_process, train_in_process
from training.errors import RecipeError
from training.model.loading import Device
from training.recipe import load_recipe, parse_overrides
from training.train.sft_config import build_sft_config, sft_kwargs

CPU = Device("cpu", "cpu", 1, False)
GPU = Device("cuda", "NVIDIA H100", 1, True)
RECIPES = sorted(Path("recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
model: {name: tiny://llama}
data: {source: data/ja_dolly.jsonl, format: instruction, template: dolly-ja}
"""


def error_of(tmp_path: Path, text: str = BASE, overrides: list[str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        recipe = load_recipe(path, overrides)
        build_sft_config(recipe, CPU, "float32", str(path))
    return str(e.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_validate(recipe):
    loaded = load_recipe(recipe)
    assert loaded.output.run_name == recipe.stem
    build_sft_config(loaded, CPU, "float32", str(recipe))
    gpu = sft_kwargs(loaded, GPU, "bfloat16", str(recipe))
    assert gpu["bf16"] and not gpu["fp16"]


def test_seed_recipes_keep_the_settings_they_document():
    ko = load_recipe("recipes/llama2-7b-ko-instructions.yaml")
    assert (ko.lora.r, ko.lora.alpha, ko.lora.dropout) == (64, 16, 0.1)
    assert ko.data.split == "train[:10%]" and ko.data.packing and ko.data.max_length == 2048
    args = sft_kwargs(ko, GPU, "float16", "ko")
    assert args["fp16"] and args["optim"] == "paged_adamw_32bit" and args["learning_rate"] == 2e-4
    assert (args["weight_decay"], args["max_grad_norm"], args["warmup_steps"]) == (0.001, 0.3, 0.03)
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 8
    assert args["lr_scheduler_type"] == "cosine" and args["num_train_epochs"] == 3

    calm = load_recipe("recipes/open-calm-7b-dolly-ja.yaml")
    args = sft_kwargs(calm, GPU, "bfloat16", "calm")
    assert calm.data.validation.fraction == 0.1 and calm.data.max_length == 512
    assert args["eval_steps"] == 200 and args["save_steps"] == 200 and args["learning_rate"] == 3e-4


def test_paged_optimizer_falls_back_to_adamw_on_cpu():
    ko = load_recipe("recipes/llama2-7b-ko-instructions.yaml")
    assert build_sft_config(ko, CPU, "float32", "ko").optim == "adamw_torch"


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    msg = error_of(tmp_path, BASE + "lora: {r: 8, alpah: 16}\n")
    assert "r.yaml" in msg and "lora.alpah" in msg and "did you mean 'alpha'" in msg
    assert "allowed: r, alpha, dropout" in msg


def test_unknown_section(tmp_path):
    msg = error_of(tmp_path, BASE + "trainer: {max_steps: 3}\n")
    assert "trainer: unknown key" in msg and "training" in msg


def test_wrong_type_and_bad_choice(tmp_path):
    msg = error_of(tmp_path, BASE + "lora: {r: many}\nquantization: {method: nf5}\n")
    assert "lora.r: Input should be a valid integer" in msg and "'many'" in msg
    assert "quantization.method" in msg and "'nf4', 'fp4', 'int8', 'none' or 'gptq'" in msg


def test_missing_required_keys(tmp_path):
    msg = error_of(tmp_path, "data: {source: x.jsonl}\n")
    assert "model: required key is missing" in msg and "data.format: required key is missing" in msg


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("data: {source: d.jsonl, format: text, completion_only_loss: true}", "format 'text' does not"),
        ("data: {source: d.jsonl, format: instruction}", "needs a template"),
        ("data: {source: d.jsonl, format: text, template: model}", "only applies to formats"),
        ("data: {source: d.jsonl, format: instruction, template: chatml}", "unknown template 'chatml'"),
        (
            "data: {source: d.jsonl, format: shargpt, template: alpaca}",
            "one of: text, instruction, messages, sharegpt",
        ),
        (
            "data: {source: d.jsonl, format: messages, template: alpaca, roles: {bot: assistant}}",
            "roles names the speakers of format sharegpt",
        ),
        (
            "data: {source: d.jsonl, format: sharegpt, template: alpaca, roles: {bot: robot}}",
            "data.roles.bot: Input should be 'system', 'user' or 'assistant'",
        ),
        (
            "data: {source: d.jsonl, format: instruction, template: 'Q: {question} A: {output}'}",
            "unknown field",
        ),
        (
            "data: {source: d.jsonl, format: instruction, template: 'Q: {instruction}{output}'}",
            "put a marker",
        ),
        ("data: {source: d.jsonl, format: instruction, template: alpaca, validation: 1.5}", "less than 1"),
        (
            "data: {source: d.jsonl, format: instruction, template: alpaca, validation: {fraction: 0.1, file: v.jsonl}}",
            "exactly one of",
        ),
    ],
)
def test_impossible_data_combinations(tmp_path, extra, expected):
    assert expected in error_of(tmp_path, "model: {name: tiny://llama}\n" + extra + "\n")


def test_impossible_lora_and_quantization_combinations(tmp_path):
    assert "include_mlp only applies" in error_of(
        tmp_path, BASE + "lora: {target_modules: [q_proj], include_mlp: true}\n"
    )
    assert "use_dora is not supported on GPTQ" in error_of(
        tmp_path, BASE + "quantization: {method: gptq}\nlora: {use_dora: true}\n"
    )


def test_training_keys_are_checked_against_sftconfig(tmp_path):
    msg = error_of(
        tmp_path,
        BASE
        + "training:\n  lerning_rate: 0.1\n  warmup_ratio: 0.1\n  output_dir: /x\n  max_seq_length: 9\n"
        + "  per_device_train_batch_size: lots\n",
    )
    assert "training.lerning_rate: not an option" in msg and "did you mean 'learning_rate'" in msg
    assert "training.warmup_ratio: no longer exists; use warmup_steps" in msg
    assert "training.output_dir: set by output.dir" in msg
    assert "training.max_seq_length: no longer exists; use data.max_length" in msg
    assert "training.per_device_train_batch_size: Input should be a valid integer" in msg


def test_a_validation_split_that_is_no_number_says_what_is_allowed(tmp_path):
    msg = error_of(tmp_path, BASE + "data: {source: d.jsonl, format: text, validation: 0.1.5}\n")
    assert "data.validation: give a fraction between 0 and 1 (0.1), {file: path.jsonl}" in msg


def test_a_value_outside_a_fields_documented_choices_is_refused_with_them(tmp_path):
    # transformers falls back to random batches for a sampling strategy it does not know.
    msg = error_of(tmp_path, BASE + "training: {train_sampling_strategy: grouped}\n")
    assert (
        "training.train_sampling_strategy: 'grouped' is not one of random, sequential, group_by_length, "
        "batch_rebalance" in msg
    )


@pytest.mark.parametrize(
    ("setting", "allowed"),
    [
        ("per_device_train_batch_size=0", "1 or more (got 0)"),  # torch's sampler, after loading
        ("per_device_eval_batch_size=-2", "1 or more (got -2)"),
        ("gradient_accumulation_steps=0", "1 or more (got 0)"),  # ZeroDivisionError in the Trainer
        ("learning_rate=-1", "0 or more (got -1.0)"),  # the optimizer, after loading
        ("num_train_epochs=-1", "more than 0"),  # trained no step and reported success
        ("num_train_epochs=0", "more than 0"),
        ("max_steps=0", "1 or more, or -1 to train num_train_epochs (got 0)"),  # trained one step
        ("max_steps=-5", "1 or more, or -1 to train num_train_epochs (got -5)"),
        ("save_steps=-5", "a whole number of steps, or a fraction of all steps below 1"),  # never saved
        ("save_steps=2.5", "a whole number of steps"),  # SFTConfig blamed eval_steps for it
        ("logging_steps=0", "more than 0: a whole number of steps"),
        ("eval_steps=-1", "a whole number of steps"),
        ("warmup_steps=-0.1", "0 or more"),
        ("weight_decay=-0.01", "0 or more"),
        ("adam_beta2=1", "at least 0 and below 1 (got 1.0)"),
        ("adam_epsilon=-1e-8", "0 or more"),
        ("label_smoothing_factor=1.5", "at least 0 and below 1 (got 1.5)"),  # trained away from the targets
        ("eval_accumulation_steps=0", "1 or more (unset: keep every eval batch in memory)"),
        ("dataloader_num_workers=-1", "0 or more (got -1)"),
        ("seed=-1", "from 0 to 2**32 - 1 (got -1)"),  # numpy refuses it when training starts
    ],
)
def test_a_training_value_out_of_range_is_refused_with_what_is_allowed(tmp_path, setting, allowed):
    key = setting.split("=")[0]
    msg = error_of(tmp_path, overrides=[f"training.{setting}"])
    assert msg.startswith(f"{tmp_path / 'r.yaml'}: invalid recipe")
    assert f"training.{key}: must be " in msg and allowed in msg


@pytest.mark.parametrize(
    "settings",
    [
        ["max_steps=-1"],  # train num_train_epochs
        ["max_steps=5", "num_train_epochs=0"],  # max_steps overrides the epochs
        ["num_train_epochs=0.5", "warmup_steps=0.03", "logging_steps=0.1", "save_steps=0.25"],  # fractions
        ["save_steps=0", "eval_steps=0", "learning_rate=0", "seed=0"],  # 0: at the end, as logging_steps
        ["save_steps=20.0", "adam_beta1=0", "dataloader_num_workers=0"],
        ["label_smoothing_factor=0.1", "eval_accumulation_steps=4"],
    ],
)
def test_the_edges_the_trainer_accepts_are_accepted(tmp_path, settings):
    recipe = load_recipe(write(tmp_path, BASE), [f"training.{s}" for s in settings])
    build_sft_config(recipe, CPU, "float32", "r.yaml")


def test_validate_and_train_refuse_a_value_out_of_range_before_writing_anything(tiny_dir, tmp_path):
    out = tmp_path / "outputs"
    bad = ["--set", "training.per_device_train_batch_size=0", "--set", f"output.dir={out}"]
    for command in ("validate", "train"):
        done = cli_in_process(command, "--recipe", "recipes/quickstart.yaml", *bad)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "recipes/quickstart.yaml: invalid recipe" in done.stderr
        assert "training.per_device_train_batch_size: must be 1 or more (got 0)" in done.stderr
        assert "Traceback" not in done.stderr
    # Each process a launcher starts checks them again, before its first write.
    with pytest.raises(RecipeError, match=r"training.gradient_accumulation_steps: must be 1 or more"):
        train_in_process("recipes/quickstart.yaml", out, "training.gradient_accumulation_steps=0")
    assert not out.exists()


def test_sftconfig_rejects_bad_values_with_its_own_message(tmp_path):
    msg = error_of(tmp_path, BASE + "training: {lr_scheduler_type: sideways}\n")
    assert "SFTConfig rejects" in msg and "cosine" in msg


def test_eval_strategy_without_validation_split(tmp_path):
    assert "data.validation is not" in error_of(tmp_path, BASE + "training: {eval_strategy: steps}\n")


def test_yaml_learning_rate_string_is_converted(tmp_path):
    # YAML 1.1 reads 2e-4 (no dot) as a string; the recipe must still mean 0.0002.
    recipe = load_recipe(write(tmp_path, BASE + "training: {learning_rate: 2e-4}\n"))
    assert build_sft_config(recipe, CPU, "float32").learning_rate == pytest.approx(2e-4)


def test_yaml_no_means_the_word_for_strategy_fields(tmp_path):
    with_validation = "model: {name: tiny://llama}\ndata: {source: d.jsonl, format: text, validation: 0.1}\n"
    recipe = load_recipe(
        write(tmp_path, with_validation), ["training.eval_strategy=no", "training.save_strategy=no"]
    )
    args = sft_kwargs(recipe, CPU, "float32")
    assert args["eval_strategy"] == "no" and args["save_strategy"] == "no"
    assert "yes is not a valid IntervalStrategy" in error_of(
        tmp_path, with_validation, ["training.eval_strategy=yes"]
    )


def test_overrides_set_nested_typed_values(tmp_path):
    recipe = load_recipe(
        write(tmp_path, BASE),
        [
            "lora.r=4",
            "training.max_steps=7",
            "data.template=Q: {instruction}\nA: {output}",
            "output.run_name=x",
        ],
    )
    assert recipe.lora.r == 4 and recipe.training["max_steps"] == 7 and recipe.output.run_name == "x"
    assert recipe.data.template.startswith("Q: ")


def test_override_errors(tmp_path):
    with pytest.raises(RecipeError, match="expected key.path=value"):
        parse_overrides(["lora.r"])
    with pytest.raises(RecipeError, match="not a section"):
        load_recipe(write(tmp_path, BASE), ["model.name.x=1"])
    assert "lora.r: Input should be greater than 0" in error_of(tmp_path, overrides=["lora.r=0"])


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_recipe_that_is_not_utf8_or_is_a_directory(tmp_path):
    # A recipe saved by an editor in Shift-JIS or CP949 (comments in Japanese or Korean) was a
    # UnicodeDecodeError traceback; a folder was "recipe file not found", which it is not.
    path = tmp_path / "sjis.yaml"
    path.write_bytes((BASE + "# 日本語のコメント\n").encode("shift_jis"))
    result = cli_in_process("validate", "--recipe", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}: not UTF-8 text" in result.stderr and "save the recipe as UTF-8" in result.stderr
    with pytest.raises(RecipeError, match="is a directory, not a recipe file"):
        load_recipe(tmp_path)


def test_run_name_must_be_a_plain_name(tmp_path):
    assert "plain directory name" in error_of(tmp_path, BASE + "output: {run_name: ../escape}\n")


def test_validate_command_reports_errors_without_traceback(tmp_path):

    bad = write(tmp_path, BASE + "lora: {r: -1}\n")
    result = cli_in_process("validate", "--recipe", str(bad))
    assert result.returncode == 2
    assert "error:" in result.stderr and "lora.r" in result.stderr and "Traceback" not in result.stderr
    ok = cli_in_process("validate", "--recipe", "recipes/quickstart.yaml")
    assert ok.returncode == 0 and "ok" in ok.stdout


def test_validate_checks_every_row_of_local_data_before_any_model_loads(tmp_path):
    # validate said "ok" and train then stopped at the bad row, after loading the model (on a GPU job,
    # after minutes). It needs no model: the tiny models are not built here.
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"질문 {i}", "output": f"답변 {i}"} for i in range(9)]
    data.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:4])
        + '\n{"instruction": "빈 답"}\n'
        + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[4:])
        + "\n",
        encoding="utf-8",
    )
    recipe = write(
        tmp_path,
        f"model: {{name: tiny://llama}}\ndata: {{source: {data}, format: instruction, template: koalpaca}}\n",
    )
    refused = cli_in_process("validate", "--recipe", str(recipe))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{data} line 5: output: missing" in refused.stderr and "data.on_bad_row: skip" in refused.stderr
    skipped = cli_in_process(
        "validate", "--recipe", str(recipe), "--set", "data.on_bad_row=skip", "--set", "data.validation=0.25"
    )
    assert skipped.returncode == 0, skipped.stderr
    assert (
        f"{data}: 7 training rows, 2 validation rows; 1 bad rows skipped (data.on_bad_row: skip), e.g. {data} line 5"
        in skipped.stdout
    )

"""lm-evaluation-harness on the run's models: the shipped task, agreement with our own log-likelihood, hub tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.conftest import quickstart_recipe
from training.errors import UserError
from training.model.loading import Device, load_model
from training.model.scoring import continuation_logprob, perplexity
from training.release.evaluate import HarnessSettings, evaluate, write_report
from training.release.harness import HarnessMismatch, agreement_check, select_tasks

CPU = Device("cpu", "cpu", 1, False)
TASK = "qlora_stack_mc"
# A fixed choice of the shipped task: the right answer to "대한민국의 수도는 어디입니까?".
CONTEXT, CHOICE = "질문: 대한민국의 수도는 어디입니까?\n답:", " 서울"


@pytest.fixture(scope="module")
def selection():
    return select_tasks([TASK])


def test_shipped_task_scores_every_variant_and_the_roundtrip_merge_scores_as_trained(
    quickstart_run, both_bases, tmp_path
):
    merged_dir, _ = both_bases
    recipe = quickstart_recipe(quickstart_run)
    variants = ["base", "adapter", str(merged_dir / "original"), str(merged_dir / "nf4-roundtrip")]
    report = evaluate(recipe, variants, prompts=0, harness=HarnessSettings(tasks=[TASK]))

    assert report["harness"]["tasks"] == [TASK] and report["harness"]["lm_eval_version"] == "0.4.13"
    models = report["models"]
    assert list(models) == ["base", "adapter (nf4)", "merged (original)", "merged (nf4-roundtrip)"]
    for label, r in models.items():
        scores = r["harness"][TASK]
        assert scores["samples"] == 40 and 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1, label
        assert scores["acc_stderr"] > 0
        assert r["harness_check"]["relative_diff"] <= r["harness_check"]["tolerance"], label
        assert r["perplexity"] > 1  # perplexity still comes with the scores
    # The NF4 round trip reproduces the 4-bit layers training ran with, so its answers score the same.
    trained, roundtrip = (
        models["adapter (nf4)"]["harness"][TASK],
        models["merged (nf4-roundtrip)"]["harness"][TASK],
    )
    assert (trained["acc"], trained["acc_norm"]) == (roundtrip["acc"], roundtrip["acc_norm"])

    table = write_report(report, tmp_path / "eval.json", tmp_path / "eval.png")
    assert f"{TASK} acc" in table and f"{models['base']['harness'][TASK]['acc']:.3f}" in table
    assert (
        json.loads((tmp_path / "eval.json").read_text())["models"]["base"]["harness"][TASK]["samples"] == 40
    )
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_harness_loglikelihood_of_a_fixed_choice_is_ours(quickstart_run, selection):
    """lm-eval on the 4-bit model + adapter as trained, against two computations of the project's own."""
    recipe = quickstart_recipe(quickstart_run)
    tokenizer = AutoTokenizer.from_pretrained(quickstart_run / "adapter")
    model, _ = load_model(recipe.model, recipe.quantization, CPU, torch.float32)
    model = PeftModel.from_pretrained(model, quickstart_run / "adapter").eval()

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    request = Instance(request_type="loglikelihood", doc={}, arguments=(CONTEXT, CHOICE), idx=0)
    theirs, _ = lm.loglikelihood([request])[0]

    ours = continuation_logprob(model, tokenizer, CONTEXT, CHOICE)
    # And as training's loss counts tokens (scoring.perplexity): the choice's tokens are the "response".
    ids = tokenizer(CONTEXT + CHOICE)["input_ids"]
    context_len = len(tokenizer(CONTEXT)["input_ids"])
    row = {"input_ids": ids, "assistant_masks": [0] * context_len + [1] * (len(ids) - context_len)}
    loss = perplexity(model, [row])
    assert loss["tokens"] == len(ids) - context_len >= 1
    assert theirs == pytest.approx(ours, rel=1e-5)
    assert theirs == pytest.approx(-loss["mean_nll"] * loss["tokens"], rel=1e-5)


def test_agreement_check_fails_when_the_harness_scored_another_model(quickstart_run, tiny_dir, selection):
    import lm_eval

    tokenizer = AutoTokenizer.from_pretrained(quickstart_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama").eval()
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir / "llama"), quickstart_run / "adapter"
    ).eval()
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=base, tokenizer=tokenizer),
        tasks=selection.build(),
        task_manager=selection.manager,
        limit=1,
    )
    assert agreement_check(base, tokenizer, out)["relative_diff"] < 1e-5
    with pytest.raises(HarnessMismatch, match="did not score the model as loaded"):
        agreement_check(trained, tokenizer, out)


def test_unknown_task_names_are_refused_with_suggestions():
    with pytest.raises(UserError, match=r"--tasks qlora_stack_mq: .*did you mean qlora_stack_mc"):
        select_tasks(["qlora_stack_mq"])
    with pytest.raises(UserError, match="not a directory"):
        select_tasks([TASK], include_paths=["no/such/dir"])


def test_a_misspelled_task_is_named_as_such_when_the_hub_is_unreachable(monkeypatch):
    from datasets import config as datasets_config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError, match=r"--tasks qlora_stak_mc: .*did you mean qlora_stack_mc"):
        select_tasks(["qlora_stak_mc"])


def test_a_task_whose_data_is_on_the_hub_fails_offline_with_its_name(tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: my_hub_task\ndataset_path: someone/not-cached\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n",
        encoding="utf-8",
    )
    started = time.monotonic()
    with pytest.raises(UserError, match=r"lm-eval task my_hub_task: .*someone/not-cached.*need the Hub"):
        select_tasks(["my_hub_task"], include_paths=[tmp_path])  # the tests run with HF_HUB_OFFLINE=1
    assert time.monotonic() - started < 60


def test_hub_tasks_fail_fast_when_the_hub_cannot_be_reached(quickstart_run):
    """No offline switch and no route to the Hub: refused before the task index or any model loads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on 9
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "eval",
            "--set",
            f"output.dir={quickstart_run.parent}",
            "--tasks",
            "kobest_copa,qlora_stack_mc",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0
    assert "lm-eval tasks kobest_copa read their data from the Hugging Face Hub" in result.stderr
    assert "cannot be reached" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert time.monotonic() - started < 60

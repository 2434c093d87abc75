"""lm-evaluation-harness against running servers (lm-eval's local-completions): which servers work, and how well.

Log-likelihood tasks need /v1/completions with echo + logprobs (the prompt's log-probabilities).
vLLM gives them; the project's local server (transformers serve) cannot and refuses, so the
harness refuses it before scoring; generation tasks run on either.
"""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving.conftest import API_KEY
from training.errors import UserError
from training.model.scoring import continuation_logprob
from training.release.harness import TASKS_DIR, score_lm, score_model, select_tasks, server_lm

TASK = "qlora_stack_mc"
CONTEXT, CHOICE = "質問: 日本の首都はどこですか？\n答え:", " 東京"


def score_server(url: str, tokenizer_dir, selection, *, api_key=None, limit=None) -> tuple[str, dict]:
    """(served model id, scores) of a running server, as `eval --model URL` gets them."""
    lm, model_id = server_lm(url, tokenizer_dir, selection, api_key=api_key)
    return model_id, score_lm(lm, selection, limit=limit)


def test_the_local_server_is_refused_for_loglikelihood_tasks(local_server, merged_model):
    with pytest.raises(UserError) as caught:
        score_server(local_server.url, merged_model, select_tasks([TASK]), api_key=API_KEY)
    message = str(caught.value)
    assert f"{TASK} score answers by their log-likelihood" in message
    assert "returns no log-probabilities" in message  # the server's own answer, passed on
    assert "vLLM can" in message


def test_eval_refuses_such_a_server_before_it_loads_any_model(local_server, tmp_path, monkeypatch):
    from training.recipe import load_recipe
    from training.release import evaluate as evaluate_module

    def no_model(*args):
        raise AssertionError("a model was loaded before the servers were checked")

    monkeypatch.setattr(evaluate_module, "load_variant", no_model)
    recipe = load_recipe("recipes/quickstart.yaml", [f"output.dir={tmp_path}"])
    settings = evaluate_module.HarnessSettings(tasks=[TASK], api_key=API_KEY)
    with pytest.raises(
        UserError, match="score answers by their log-likelihood"
    ):  # the server last, as users list it
        evaluate_module.evaluate(recipe, ["merged", local_server.url], harness=settings)


def test_the_local_server_runs_generation_tasks(local_server, merged_model, tmp_path):
    # The shipped questions as a generation task: the answer must be generated, not picked.
    rows = TASKS_DIR / TASK / f"{TASK}.jsonl"
    (tmp_path / "gen.yaml").write_text(
        f"""task: qlora_stack_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}\\n"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
        encoding="utf-8",
    )
    selection = select_tasks(["qlora_stack_gen"], include_paths=[tmp_path])
    model_id, result = score_server(local_server.url, merged_model, selection, api_key=API_KEY, limit=3)
    assert model_id == "quickstart"
    scores = result["harness"]["qlora_stack_gen"]
    assert scores["samples"] == 3 and 0 <= scores["exact_match"] <= 1


def test_a_wrong_key_or_no_server_is_named(local_server, merged_model):
    selection = select_tasks([TASK])
    with pytest.raises(UserError, match="answered 401.*set API_KEY"):
        score_server(local_server.url, merged_model, selection, api_key="wrong")
    with pytest.raises(UserError, match="no OpenAI-compatible server answers at http://127.0.0.1:9"):
        score_server("http://127.0.0.1:9/v1", merged_model, selection)


# --- vLLM ----------------------------------------------------------------------------------
# The `vllm_server` session fixture (tests/serving/conftest.py) serves the merged quickstart model
# on vLLM's CPU engine; using it marks this test `vllm` (make test-vllm runs it).


def test_vllm_scores_like_the_model_directory(vllm_server):
    selection = select_tasks([TASK])
    tokenizer = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_server.model_dir).eval()

    lm, model_id = server_lm(vllm_server.url, vllm_server.model_dir, selection, api_key=vllm_server.api_key)
    assert model_id == vllm_server.model
    request = Instance(request_type="loglikelihood", doc={}, arguments=(CONTEXT, CHOICE), idx=0)
    served, _ = lm.loglikelihood([request])[0]
    assert served == pytest.approx(continuation_logprob(model, tokenizer, CONTEXT, CHOICE), abs=1e-3)

    _, result = score_server(vllm_server.url, vllm_server.model_dir, selection, api_key=vllm_server.api_key)
    local = score_model(model, tokenizer, selection)
    served_scores, local_scores = result["harness"][TASK], local["harness"][TASK]
    assert served_scores["samples"] == 40
    assert (served_scores["acc"], served_scores["acc_norm"]) == (
        local_scores["acc"],
        local_scores["acc_norm"],
    )

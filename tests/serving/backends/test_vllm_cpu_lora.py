"""Multi-LoRA on the CPU without merging: vLLM serves the tiny Llama with the quickstart run's adapter and
a second one, picked per request by model name, each answering what peft answers locally, also when
base and adapter requests share a batch; chat with an adapter formatted by its training template."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.client import ServingClient
from serving.errors import InvalidParameterError
from tests.serving.conftest import API_KEY
from tests.serving.local_server.test_local_server import INSTRUCTION, dolly_prompt
from training.data.templates import BUILTIN_TEMPLATES

PROMPTS = [dolly_prompt(f"{INSTRUCTION} {i}") for i in range(6)]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def base_dir(tiny_dir):
    return tiny_dir / "llama"


@pytest.fixture(scope="module")
def expected(base_dir, lora_adapters) -> dict[str, list[list[int]]]:
    """Greedy token ids for PROMPTS from the base model alone and from peft's base + each adapter."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def answers(model) -> list[list[int]]:
        out = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                generated = model.generate(**ids, do_sample=False, max_new_tokens=NEW_TOKENS)
            out.append(generated[0, ids["input_ids"].shape[1] :].tolist())
        return out

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    result = {"llama": answers(base)}
    for name, path in lora_adapters.items():
        with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), path
        ).eval()
        result[name] = answers(with_adapter)
    return result


def completion_ids(client: ServingClient, model: str, prompt: str) -> list[int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": False,
        "return_token_ids": True,
    }
    return client.transport.post_json("/v1/completions", body)["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def client(vllm_lora_server):
    with ServingClient(vllm_lora_server.url, api_key=API_KEY) as c:
        yield c


def test_models_lists_the_base_and_each_adapter(client):
    info = client.info
    assert (info.backend, info.model, set(info.adapters)) == ("vllm", "llama", {"quickstart", "attention8"})
    cards = {c["id"]: c.get("parent") for c in info.raw["data"]}
    assert cards == {"llama": None, "quickstart": "llama", "attention8": "llama"}


def test_each_adapter_answers_what_peft_answers(client, expected):
    for model in ("quickstart", "attention8", "llama"):
        assert [completion_ids(client, model, p) for p in PROMPTS] == expected[model], model
    assert expected["quickstart"] != expected["llama"] != expected["attention8"]  # the adapters matter


def test_base_and_adapter_requests_in_one_batch_each_get_their_own_model(client, expected):
    # The CPU build indexes "no adapter" as the last LoRA slot; the spare slot the launcher adds keeps
    # that slot empty. Without it the base rows here come back with an adapter's tokens.
    jobs = [(model, i) for i in range(len(PROMPTS)) for model in ("llama", "quickstart", "attention8")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: completion_ids(client, job[0], PROMPTS[job[1]]), jobs))
    assert got == [expected[model][i] for model, i in jobs]


def test_the_client_picks_an_adapter_and_refuses_one_vllm_does_not_serve(
    vllm_lora_server, client, base_dir, expected
):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with ServingClient(vllm_lora_server.url, api_key=API_KEY, adapter_id="quickstart") as with_adapter:
        result = with_adapter.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    assert result.text == tokenizer.decode(expected["quickstart"][0], skip_special_tokens=True)
    with pytest.raises(InvalidParameterError, match="serves no adapter 'other'; adapters: "):
        client.generate(PROMPTS[0], max_new_tokens=2, adapter_id="other")


def test_chat_with_an_adapter_is_formatted_with_its_training_template(vllm_lora_server, base_dir, expected):
    # The tiny base model has no chat template; the quickstart adapter carries its training's (dolly-ja),
    # which serve passes vLLM. Without it vLLM answers every chat request 400 ("default chat template is
    # no longer allowed").
    messages = BUILTIN_TEMPLATES["dolly-ja"].instruction_messages(f"{INSTRUCTION} 0")
    trained_ids = AutoTokenizer.from_pretrained(base_dir)(PROMPTS[0])["input_ids"]  # BOS + dolly-ja
    with ServingClient(vllm_lora_server.url, api_key=API_KEY, adapter_id="quickstart") as with_adapter:
        body = {"model": "quickstart", "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0}
        answer = with_adapter.transport.post_json("/v1/chat/completions", {**body, "return_token_ids": True})
        result = with_adapter.chat(messages, max_new_tokens=NEW_TOKENS)  # what `make chat --adapter` sends
    assert answer["prompt_token_ids"] == trained_ids
    assert answer["choices"][0]["token_ids"] == expected["quickstart"][0]  # peft's answer to that prompt
    assert result.text == answer["choices"][0]["message"]["content"]
    assert result.prompt_tokens == len(trained_ids)


def test_sigterm_stops_the_server_cleanly(vllm_lora_server):
    assert vllm_lora_server.url.startswith("http://127.0.0.1:")  # started, and answering
    assert vllm_lora_server.stop() == 0

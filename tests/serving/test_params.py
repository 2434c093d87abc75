"""Generation parameters: refused with a reason before sending, and written each backend's way."""

from __future__ import annotations

import pytest

from serving.backends import get_backend
from serving.backends.base import ServerInfo
from serving.errors import InvalidParameterError
from serving.params import SamplingParams

TGI, VLLM, LOCAL = (get_backend(n) for n in ("tgi", "vllm", "local"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1, got 0"),
        ({"max_new_tokens": 1.5}, "max_new_tokens must be a whole number"),
        ({"temperature": -0.1}, r"temperature must be a number >= 0 \(0 = greedy decoding"),
        ({"temperature": float("nan")}, "temperature must be a number"),
        (
            {"temperature": 0.7, "top_p": 0.0},
            r"top_p must be in \(0, 1\], got 0.0; TGI's /generate needs top_p < 1",
        ),
        ({"temperature": 0.7, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 0.7, "top_k": 0}, "top_k must be a whole number >= 1"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be > 0 \(1.0 = no penalty\)"),
        ({"top_p": 0.9}, "top_p only applies when sampling: set temperature > 0"),
        ({"top_k": 40}, "top_k only applies when sampling"),
        ({"stop": ["ok", ""]}, "stop must be a list of non-empty strings"),
        ({"seed": -1}, r"seed must be a whole number in \[0, 2\*\*64\)"),
    ],
)
def test_bad_parameters_name_what_is_allowed(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        SamplingParams(**kwargs)


def test_defaults_are_greedy_and_top_p_one_is_no_nucleus():
    p = SamplingParams()
    assert not p.sampling and p.max_new_tokens is None  # the client fits it to the prompt, per request
    assert SamplingParams(temperature=0.5, top_p=1.0).nucleus is False
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_tgi_generate_greedy_has_no_sampling_knobs():
    assert TGI.raw_fields(SamplingParams(max_new_tokens=5, stop=["。"], seed=1, repetition_penalty=1.1)) == {
        "max_new_tokens": 5,
        "do_sample": False,
        "details": True,
        "stop": ["。"],
        "seed": 1,
        "repetition_penalty": 1.1,
    }


def test_tgi_generate_sampling():
    kwargs = TGI.raw_fields(SamplingParams(temperature=0.8, top_p=0.95, top_k=50))
    assert kwargs["do_sample"] is True and (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (
        0.8,
        0.95,
        50,
    )


def test_chat_fields_per_backend():
    greedy = VLLM.chat_fields(SamplingParams(max_new_tokens=9))
    assert greedy == {"max_tokens": 9, "temperature": 0.0}
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.2)
    assert VLLM.chat_fields(p)["extra_body"] == {"top_k": 20, "repetition_penalty": 1.2}
    assert LOCAL.chat_fields(p)["top_p"] == 0.9
    tgi = TGI.chat_fields(SamplingParams(temperature=0.7, repetition_penalty=1.2))
    assert "extra_body" not in tgi and tgi["presence_penalty"] == pytest.approx(-0.8)


def test_completion_fields_for_openai_servers():
    body = VLLM.raw_fields(SamplingParams(max_new_tokens=3, temperature=0.5, top_k=4, stop=["x"], seed=2))
    assert body == {"max_tokens": 3, "temperature": 0.5, "top_k": 4, "stop": ["x"], "seed": 2}


def test_backend_limits():
    VLLM.check_params(SamplingParams(temperature=1, top_k=3), "chat", ServerInfo("vllm", "vLLM", "u", "m"))
    tgi = ServerInfo("tgi", "TGI", "u", "m", max_stop_sequences=4)
    with pytest.raises(InvalidParameterError, match="TGI's /v1/chat/completions has no top_k"):
        TGI.check_params(SamplingParams(temperature=1, top_k=3), "chat", tgi)
    two = ServerInfo("tgi", "TGI", "u", "m", max_stop_sequences=2)
    with pytest.raises(InvalidParameterError, match="at most 2 stop sequences"):
        TGI.check_params(SamplingParams(stop=["a", "b", "c"]), "generate", two)

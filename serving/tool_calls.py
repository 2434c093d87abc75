"""Which of vLLM's tool-call parsers reads the tool calls a model writes, told from its chat template.

vLLM answers a chat request that offers `tools` (tool_choice "auto", the default once tools are
given) only when it was started with --enable-auto-tool-choice and a --tool-call-parser for the
model's own call syntax; otherwise every such request is a 400. A model fine-tuned on tool calls
(chat rows with tool_calls turns and data.template: model) writes them as its chat template
rendered them in training, so rendering one probe call through the served template tells which
parser reads them back. Only the formats below are told apart; any other parser of vLLM's is
chosen by name (serve --tool-call-parser, TOOL_CALL_PARSER).
"""

from __future__ import annotations

import re
from collections.abc import Callable

AUTO = "auto"  # pick from the chat template
OFF = "none"  # no tool calls: vLLM refuses requests that offer tools with "auto" choice

# The parsers vLLM 0.32 registers (vllm/tool_parsers/__init__.py, ToolParserManager), as a check
# before the minutes of loading a model: vLLM itself takes any name and fails only once loaded.
# tests/serving/backends/test_vllm_cpu.py compares this list with the installed vLLM's.
VLLM_PARSERS = frozenset(
    {
        "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31",
        "deepseek_v32", "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4",
        "gigachat3", "glm45", "glm47", "granite", "granite-20b-fc", "granite4", "hermes", "hf",
        "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba", "k2_horizon", "kimi_k2",
        "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json", "llama4_pythonic", "longcat",
        "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral", "muse_glimmer", "olmo3",
        "openai", "phi4_mini_json", "plamo3", "poolside_v1", "pythonic", "qwen3_coder",
        "qwen3_json", "qwen3_xml", "seed_oss", "step3", "step3p5", "xlam",
    }
)  # fmt: skip

_NAME = "probe_lookup"
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _NAME,
            "description": "Look something up.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]
_PROMPT = [{"role": "user", "content": "Look up the probe."}]
_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"type": "function", "function": {"name": _NAME, "arguments": {"query": "probe"}}}],
}

# How each format writes the probe call, and the vLLM parser that reads it back.
_FORMATS = (
    # Qwen2.5, Qwen3, Hermes 2 Pro: JSON between <tool_call> tags
    (re.compile(r'<tool_call>\s*\{"name": "probe_lookup", "arguments"'), "hermes"),
    # Qwen3-Coder, Qwen3.5 and later: XML, <tool_call><function=NAME><parameter=KEY>
    (re.compile(r"<tool_call>\s*<function=probe_lookup>\s*<parameter=query>"), "qwen3_coder"),
    # Llama 3.1 and 3.2: a bare JSON object with "parameters"
    (re.compile(r'^\s*(<\|python_tag\|>)?\{"name": "probe_lookup", "parameters"'), "llama3_json"),
)


# A chat template renderer: (template, messages, tools, add_generation_prompt) -> the text.
Renderer = Callable[[str, list[dict], list[dict], bool], str]


def template_parser(chat_template: str | None, render: Renderer | None = None) -> str | None:
    """The vLLM parser for the tool calls `chat_template` writes; None when it writes none we know
    (or cannot render a call at all, as the built-in templates cannot). Rendered by `render` (the
    server's own renderer), else as transformers renders it."""
    if not chat_template:
        return None
    turn = _rendered_call(chat_template, render)
    if turn is None:
        return None
    return next((parser for pattern, parser in _FORMATS if pattern.search(turn)), None)


def renders_calls(chat_template: str | None, render: Renderer | None = None) -> bool:
    """Whether `chat_template` writes an assistant turn's tool calls at all, in any syntax; rendered
    by `render` (the server's own renderer), else as transformers renders it."""
    turn = _rendered_call(chat_template, render) if chat_template else None
    return turn is not None and _NAME in turn


def choose(requested: str | None, chat_template: str | None) -> str | None:
    """The parser to start vLLM with: `requested` (a vLLM parser name, 'auto' or 'none'; unset is
    'auto'), else the one the template calls for. A name vLLM does not know is a ValueError."""
    requested = (requested or AUTO).strip()
    if requested == OFF:
        return None
    if requested == AUTO:
        return template_parser(chat_template)
    if requested not in VLLM_PARSERS:
        raise ValueError(
            f"unknown tool-call parser {requested!r}; '{AUTO}' (from the chat template), '{OFF}', or one "
            f"of vLLM's: {', '.join(sorted(VLLM_PARSERS))}"
        )
    return requested


def render_with_transformers(
    chat_template: str, messages: list[dict], tools: list[dict], add_generation_prompt: bool
) -> str:
    """transformers' own renderer (its sandbox and its conversions of tools and messages), imported
    here: the clients that import serving need no transformers."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [messages],
        tools=tools,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        bos_token="",
        eos_token="",
    )
    return rendered[0]


def _rendered_call(chat_template: str, render: Renderer | None = None) -> str | None:
    """The assistant turn holding the probe call, as the template renders it."""
    render = render or render_with_transformers
    try:
        full = render(chat_template, [*_PROMPT, _CALL], _TOOLS, False)
        prompt = render(chat_template, _PROMPT, _TOOLS, True)
    except Exception:  # a template that refuses tool calls (raise_exception) or cannot render them
        return None
    # The turn alone: a system preamble that describes the call syntax is not a call.
    return full[len(prompt) :] if full.startswith(prompt) else full[full.rfind(_PROMPT[0]["content"]) :]

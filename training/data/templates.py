"""Prompt templates, and the Jinja chat templates built from them.

A template is used twice: in training, to render each example and mark which tokens are
the response ({% generation %} blocks, read by transformers'
`return_assistant_tokens_mask`); and after training, saved as the tokenizer's
`chat_template`, so the merged model, TGI's /v1/chat/completions, vLLM and any chat
client format prompts exactly as training did.

Whitespace at the end of the assistant prefix (the space in "<bot> answer") is rendered
inside the response block. The generation prompt then ends on "<bot>" and the model
produces " answer" as it saw it in training, instead of the prompt ending in a lone
space token that never occurred in training.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

CUSTOM_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user_prefix: str
    assistant_prefix: str
    turn_separator: str = "\n"
    # How an instruction's optional input joins it; None: the template has no input slot.
    input_join: str | None = None
    # System turns: None means the template has no place for a system message.
    system_prefix: str | None = None
    system_suffix: str = ""
    default_system: str | None = None
    default_system_with_input: str | None = None

    def instruction_messages(self, instruction: str, input_text: str = "") -> list[dict[str, str]]:
        """The chat turns an instruction row stands for (without the response)."""
        content = instruction
        if input_text:
            if self.input_join is None:
                raise ValueError(f"template '{self.name}' has no {{input}} slot")
            content = instruction + self.input_join + input_text
        messages = []
        system = self.default_system_with_input if input_text else None
        if system is not None and system != self.default_system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        return messages

    def chat_template(self, add_bos: bool) -> str:
        """A Jinja chat template that renders conversations in this format."""
        prompt_end, response_lead = _split_trailing_whitespace(self.assistant_prefix)
        q = _literal
        content = (
            "{% if message.content is string %}{% set content = message.content %}"
            "{% else %}{% set content = message.content | map(attribute='text') | join('') %}{% endif %}"
        )
        parts = []
        if add_bos:
            parts.append("{{ bos_token }}")
        if self.system_prefix is not None and self.default_system is not None:
            parts.append(
                "{% if messages[0].role != 'system' %}"
                f"{{{{ {q(self.system_prefix + self.default_system + self.system_suffix)} }}}}"
                "{% endif %}"
            )
        parts.append("{% for message in messages %}")
        parts.append(content)
        parts.append("{% if message.role == 'system' %}")
        if self.system_prefix is None:
            parts.append(
                f"{{{{ raise_exception({q(f'The {self.name} template has no place for a system message.')}) }}}}"
            )
        else:
            parts.append(
                "{% if not loop.first %}"
                f"{{{{ raise_exception({q('A system message is only allowed as the first message.')}) }}}}"
                "{% endif %}"
                f"{{{{ {q(self.system_prefix)} + content + {q(self.system_suffix)} }}}}"
            )
        parts.append("{% elif message.role == 'user' %}")
        parts.append(f"{{{{ {q(self.user_prefix)} + content }}}}")
        parts.append("{% elif message.role == 'assistant' %}")
        parts.append(
            f"{{{{ {q(prompt_end)} }}}}"
            "{% generation %}"
            f"{{{{ {q(response_lead)} + content + eos_token }}}}"
            "{% endgeneration %}"
            f"{{% if not loop.last %}}{{{{ {q(self.turn_separator)} }}}}{{% endif %}}"
        )
        parts.append("{% else %}")
        parts.append(
            f"{{{{ raise_exception({q('Unsupported role: ')} + message.role"
            f" + {q('; allowed: system, user, assistant.')}) }}}}"
        )
        parts.append("{% endif %}")
        parts.append("{% endfor %}")
        parts.append(f"{{% if add_generation_prompt %}}{{{{ {q(prompt_end)} }}}}{{% endif %}}")
        return "".join(parts)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _split_trailing_whitespace(text: str) -> tuple[str, str]:
    stripped = text.rstrip()
    return stripped, text[len(stripped) :]


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    # KoAlpaca / open-korean-instructions style: "<usr> question\n<bot> answer".
    "koalpaca": PromptTemplate(
        name="koalpaca",
        user_prefix="<usr> ",
        input_join="\n",
        assistant_prefix="\n<bot> ",
        system_prefix="<sys> ",
        system_suffix="\n",
    ),
    # databricks-dolly-15k-ja style; the input line appears only when the input is non-empty.
    "dolly-ja": PromptTemplate(
        name="dolly-ja",
        user_prefix="ユーザー:",
        input_join="\n入力:",
        assistant_prefix="\nシステム:",
    ),
    # Stanford Alpaca, with its two preambles (with and without an input).
    "alpaca": PromptTemplate(
        name="alpaca",
        user_prefix="### Instruction:\n",
        input_join="\n\n### Input:\n",
        assistant_prefix="\n\n### Response:\n",
        turn_separator="\n\n",
        system_prefix="",
        system_suffix="\n\n",
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
        ),
        default_system_with_input=(
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request."
        ),
    ),
}

# The base tokenizer's own chat template (Qwen-Instruct, Llama-3-Instruct, ...).
MODEL_TEMPLATE = "model"


def parse_custom_template(text: str) -> PromptTemplate:
    """Build a template from a string such as "Q: {instruction}\\nContext: {input}\\nA: {output}".

    {instruction} and {output} are required, {input} is optional and, like the input line of
    dolly-ja, is left out together with the text before it when a row has no input.
    {output} must come last.
    """
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"custom template {text!r} is not a valid format string: {e}") from None
    fields = [f for _, f, _, _ in pieces if f is not None]
    unknown = [f for f in fields if f not in CUSTOM_FIELDS]
    if unknown:
        raise ValueError(
            f"custom template {text!r} uses unknown field(s) {unknown}; allowed: "
            "{instruction}, {input}, {output} (write literal braces as {{ and }})"
        )
    expected = ["instruction", "input", "output"] if "input" in fields else ["instruction", "output"]
    if fields != expected:
        raise ValueError(
            f"custom template {text!r} must contain {{instruction}}, optionally {{input}}, and "
            "{output}, each once and in that order"
        )
    literals = [lit for lit, _, _, _ in pieces]
    if len(pieces) > len(fields) and literals[-1]:
        raise ValueError(f"custom template {text!r}: nothing may follow {{output}}")
    if "input" in fields:
        user_prefix, input_join, assistant_prefix = literals[0], literals[1], literals[2]
    else:
        user_prefix, input_join, assistant_prefix = literals[0], None, literals[1]
    if not assistant_prefix.strip():
        raise ValueError(
            f"custom template {text!r}: put a marker between the prompt and {{output}} "
            "(e.g. '\\n### Answer: '), so the model can tell where its answer starts"
        )
    return PromptTemplate(
        name="custom", user_prefix=user_prefix, input_join=input_join, assistant_prefix=assistant_prefix
    )


def resolve_template(spec: str) -> PromptTemplate | None:
    """A built-in or custom template; None for 'model' (the tokenizer's own template)."""
    if spec == MODEL_TEMPLATE:
        return None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{" not in spec:
        raise ValueError(
            f"unknown template {spec!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}, or 'model', or a "
            "custom string with {instruction}, optional {input} and {output}"
        )
    return parse_custom_template(spec)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts plain text with BOS (Llama does, GPT-NeoX does not).

    Chat templates are tokenized without special tokens, so the template must write BOS
    itself exactly when the model saw it in pre-training.
    """
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id

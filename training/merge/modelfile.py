"""An Ollama Modelfile for a GGUF export: FROM the file, the chat template as a Go template, stops.

Ollama formats chats with a Go text/template over `.Messages` (each with `.Role` and
`.Content`), not with the Jinja template in the GGUF. The project's prompt templates
(koalpaca, dolly-ja, alpaca, custom strings) are simple enough to translate exactly: the Go
template renders a conversation as the Jinja chat template renders it with
add_generation_prompt, except for BOS, which Ollama's llama.cpp runner adds itself from the
GGUF's add_bos_token. A base model's own template (`template: model`) is not translated: the
Modelfile then has no TEMPLATE and says why; `ollama create` then picks a template of its own
by comparing the GGUF's chat template with the ones it knows.

Format (Ollama docs/modelfile.mdx, parser/parser.go): one instruction per line, `#` comments,
values in "..." or, when they span lines, in triple quotes, with no escapes: a value cannot
hold `\"\"\"`, and characters Go's strconv.IsPrint rejects (other than newline and tab) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.data.templates import PromptTemplate

TRIPLE = '"""'


class ModelfileError(ValueError):
    pass


@dataclass(frozen=True)
class Modelfile:
    text: str
    template: str | None  # the Go template, None where the chat template was not translated
    stops: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def _literal(text: str) -> str:
    """Text outside actions is copied as it is; only the left delimiter must be written as an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(template: PromptTemplate, eos_token: str) -> tuple[str, list[str]]:
    """The Go template that renders what `template.chat_template()` renders (less BOS), and notes."""
    notes = []
    prompt_end, response_lead = (
        template.assistant_prefix.rstrip(),
        template.assistant_prefix[len(template.assistant_prefix.rstrip()) :],
    )
    q = _literal
    # No {{- trimming anywhere: literal text may end in whitespace that belongs to the prompt.
    parts = []
    if template.system_prefix is not None and template.default_system is not None:
        default = template.system_prefix + template.default_system + template.system_suffix
        parts.append(
            f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{q(default)}{{{{ end }}}}'
        )
    parts.append("{{ range $i, $m := .Messages }}")
    parts.append('{{ if eq .Role "system" }}')
    if template.system_prefix is not None:
        # The Jinja template refuses a system message that is not first; Go templates cannot refuse.
        parts.append(
            f"{{{{ if eq $i 0 }}}}{q(template.system_prefix)}{{{{ .Content }}}}{q(template.system_suffix)}{{{{ end }}}}"
        )
        notes.append("a system message after the first is left out (the chat template refuses it)")
    else:
        notes.append(f"the {template.name} template has no place for a system message: Ollama's are left out")
    parts.append(f'{{{{ else if eq .Role "user" }}}}{q(template.user_prefix)}{{{{ .Content }}}}')
    parts.append(
        f'{{{{ else if eq .Role "assistant" }}}}{q(prompt_end + response_lead)}{{{{ .Content }}}}{q(eos_token)}'
        f"{{{{ if gt (len (slice $.Messages $i)) 1 }}}}{q(template.turn_separator)}{{{{ end }}}}"
    )
    parts.append("{{ end }}{{ end }}")
    parts.append(q(prompt_end))  # the generation prompt: the model answers after it
    return "".join(parts), notes


def stop_strings(template: PromptTemplate | None, eos_token: str | None) -> tuple[str, ...]:
    """Where an answer ends: EOS, and the start of a next user turn (the model may write one)."""
    stops = [eos_token] if eos_token else []
    if template is not None and template.user_prefix.strip():
        stops.append(template.user_prefix.strip())
    return tuple(dict.fromkeys(stops))


def _quoted(value: str, what: str) -> str:
    if TRIPLE in value:
        raise ModelfileError(f"{what} contains {TRIPLE}, which a Modelfile value cannot hold")
    dropped = sorted({c for c in value if not (c.isprintable() or c in "\n\t")})
    if dropped:
        raise ModelfileError(f"{what} contains characters Ollama's parser drops: {dropped!r}")
    return f"{TRIPLE}{value}{TRIPLE}" if ("\n" in value or '"' in value) else f'"{value}"'


def build_modelfile(
    gguf_name: str,
    template: PromptTemplate | None,
    template_spec: str | None,
    eos_token: str | None,
    context_length: int | None,
) -> Modelfile:
    """The Modelfile text for `ollama create NAME -f <it>`, next to the GGUF it names."""
    lines = [
        "# Ollama: ollama create <name> -f this file (written by `python -m training export`).",
        f"FROM ./{gguf_name}",
    ]
    go = None
    notes: list[str] = []
    if template is not None:
        go, notes = go_template(template, eos_token or "")
        lines.append(f"# The {template.name} chat template the model was trained with, as a Go template.")
        lines.extend(f"# Note: {n}." for n in notes)
        lines.append(f"TEMPLATE {_quoted(go, 'the chat template')}")
    else:
        why = (
            "the base model's own chat template (template: model) is not translated to Go"
            if template_spec
            else "the run's recipe names no prompt template"
        )
        notes.append(why)
        lines.append(
            f"# No TEMPLATE: {why}; Ollama picks the closest template it knows from the GGUF's chat "
            "template, or add one by hand (ollama docs: template.mdx)."
        )
    stops = stop_strings(template, eos_token)
    lines.extend(f"PARAMETER stop {_quoted(s, 'a stop string')}" for s in stops)
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    return Modelfile("\n".join(lines) + "\n", go, stops, notes)

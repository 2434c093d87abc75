"""Ollama's Modelfile parser, for tests: Ollama cannot be installed here.

It follows ollama/ollama parser/parser.go (commit 5dbb81b7, `ParseFile` and `CreateRequest`)
rule by rule: a character-level state machine over instruction name, value, parameter name and
message role; a value ends at a space or newline where the text so far, trimmed, is a complete
value (unquoted, "...", or triple-quoted, with no escapes); characters that are not printable
(Go's strconv.IsPrint, which Python's str.isprintable matches) are dropped unless they are a
space, tab or newline inside a value; instruction names are case-insensitive; FROM is required.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COMMANDS = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)
ROLES = ("system", "user", "assistant")
NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)


class ModelfileSyntaxError(ValueError):
    pass


@dataclass
class CreateRequest:
    """What `ollama create` sends the server for the parsed file (the fields these tests read)."""

    from_: str | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, list[str]] = field(default_factory=dict)
    messages: list[tuple[str, str]] = field(default_factory=list)


def _space(c: str) -> bool:
    return c in " \t"


def _newline(c: str) -> bool:
    return c in "\r\n"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _next_state(c: str, state: int, line: int) -> tuple[int, str]:
    if state == NIL:
        if c == "#":
            return COMMENT, ""
        if _space(c) or _newline(c):
            return NIL, ""
        return NAME, c
    if state == NAME:
        if c.isascii() and c.isalpha():
            return NAME, c
        if _space(c):
            return VALUE, ""
        raise ModelfileSyntaxError(f"(line {line}): command must be one of {', '.join(COMMANDS)}")
    if state == VALUE:
        return (NIL, c) if _newline(c) or _space(c) else (VALUE, c)
    if state in (PARAMETER, MESSAGE):
        if c.isascii() and (c.isalpha() or (state == PARAMETER and (c.isdigit() or c == "_"))):
            return state, c
        if _space(c):
            return VALUE, ""
        raise ModelfileSyntaxError(f"(line {line}): unexpected end of a parameter name or message role")
    return (NIL, "") if _newline(c) else (COMMENT, "")


def parse(text: str) -> list[tuple[str, str]]:
    """The (command, argument) pairs of a Modelfile, as Ollama's ParseFile reads them."""
    commands: list[tuple[str, str]] = []
    state, buf, name, role, line = NIL, "", "", "", 1
    for c in text.removeprefix("\ufeff"):
        if _newline(c):
            line += 1
        nxt, out = _next_state(c, state, line)
        if nxt != state:
            if state == NAME:
                if buf.lower() not in COMMANDS:
                    raise ModelfileSyntaxError(f"(line {line}): command must be one of {', '.join(COMMANDS)}")
                word = buf.lower()
                if word == "parameter":
                    nxt = PARAMETER
                else:
                    name = "model" if word == "from" else word
                    if word == "message":
                        nxt = MESSAGE
            elif state == PARAMETER:
                name = buf
            elif state == MESSAGE:
                if buf not in ROLES:
                    raise ModelfileSyntaxError(
                        f"(line {line}): message role must be one of {', '.join(ROLES)}"
                    )
                role = buf
            elif state == VALUE:
                value, ok = _unquote(buf.strip())
                if not ok or _space(c):
                    buf += c
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append((name, value))
            buf, state = "", nxt
        if out.isprintable():
            buf += out
    if state == VALUE:
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ModelfileSyntaxError(f"unexpected end of file in a value: {buf[:40]!r}")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (NIL, COMMENT):
        raise ModelfileSyntaxError("unexpected end of file")
    if not any(n == "model" for n, _ in commands):
        raise ModelfileSyntaxError("no FROM line")
    return commands


def create_request(text: str) -> CreateRequest:
    request = CreateRequest()
    for name, args in parse(text):
        if name == "model":
            request.from_ = args
        elif name == "template":
            request.template = args
        elif name == "system":
            request.system = args
        elif name == "message":
            role, _, content = args.partition(": ")
            request.messages.append((role, content))
        elif name not in ("license", "adapter", "renderer", "parser", "requires"):
            request.parameters.setdefault(name, []).append(args)
    return request

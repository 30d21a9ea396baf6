"""An Ollama Modelfile for a published GGUF: the chat template training used, as Ollama's Go template.

Ollama renders prompts with Go's text/template, not Jinja, so the tokenizer's chat template has to
be rewritten. loraflow does not translate Jinja source (no general translation exists). It renders
the template on marker messages and reads off what it writes around each message: a preamble
(with a system prompt, and without one), what comes before and after a user's and an assistant's
content, and the generation prompt. It then checks the pieces by rebuilding conversations of one
to three turns, with and without a system prompt, and comparing them with the template's own
rendering character for character. A template that cannot be written this way (one whose text
depends on a message's position, say) is refused, naming the conversation it renders differently.
That covers the templates loraflow ships (chatml, zephyr, alpaca) and the usual role-wrapped ones
(SmolLM2, Qwen, Llama 3).

Ollama hands a template `.System` (every system message, joined) and `.Messages` (all of them,
system ones included), so the template writes the system block from `.System` and skips system
messages in the loop. The Modelfile's `SYSTEM` is the pipeline's system prompt, which Ollama puts
first when a request has none of its own, exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loraflow.formatting import render, with_system_prompt
from loraflow.templates import end_of_turn

_SYSTEM, _USER, _ASSISTANT = "LfMarkSystem7q", "LfMarkUser3k", "LfMarkAssistant9w"
UNFIT = (
    ", so it cannot be written as an Ollama template; export with format.chat_template: chatml, zephyr "
    "or alpaca, or drop gguf from publish.exports"
)


class ModelfileError(ValueError):
    """The chat template cannot be written as an Ollama template."""


@dataclass(frozen=True)
class RolePieces:
    """What the chat template writes around each message, read off marker renderings."""

    system_open: str
    system_close: str
    no_system: str
    """What comes before the first message of a conversation without a system prompt (a default
    system block, a bos token, or nothing)."""
    user_open: str
    user_close: str
    assistant_open: str
    assistant_close: str
    generation: str
    """The generation prompt, written after the last message when a reply is wanted."""

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The text these pieces give a conversation: what the Go template writes, in Python."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = [self.system_open + system + self.system_close if system else self.no_system]
        for message in messages:
            if message["role"] == "user":
                out.append(self.user_open + message["content"] + self.user_close)
            elif message["role"] == "assistant":
                out.append(self.assistant_open + message["content"] + self.assistant_close)
        if add_generation_prompt:
            out.append(self.generation)
        return "".join(out)


def role_pieces(tokenizer) -> RolePieces:
    """Read the chat template's pieces off marker conversations, and check them (module docstring)."""
    user, assistant = f"{_USER}1", f"{_ASSISTANT}1"
    user2 = f"{_USER}2"

    def text(messages, generation=False):
        return render(tokenizer, messages, add_generation_prompt=generation)

    def between(full: str, before: str, after: str) -> str:
        start = full.index(before) + len(before)
        return full[start : full.index(after, start)]

    def cut_prefix(whole: str, prefix: str, what: str) -> str:
        if not whole.startswith(prefix):
            raise ModelfileError(
                f"the chat template's {what} does not start the way its other turns do{UNFIT}"
            )
        return whole[len(prefix) :]

    def cut_suffix(whole: str, suffix: str, what: str) -> str:
        if suffix and not whole.endswith(suffix):
            raise ModelfileError(f"the chat template's {what} does not end the way its other turns do{UNFIT}")
        return whole[: len(whole) - len(suffix)] if suffix else whole

    u = {"role": "user", "content": user}
    a = {"role": "assistant", "content": assistant}
    u2 = {"role": "user", "content": user2}
    s = {"role": "system", "content": _SYSTEM}
    try:
        three = text([u, a, u2])
        # what follows the last message is the closing of its role
        user_close = three[three.index(user2) + len(user2) :]
        two = text([u, a])
        assistant_close = two[two.index(assistant) + len(assistant) :]
        user_open = cut_prefix(between(three, assistant, user2), assistant_close, "user turn")
        assistant_open = cut_prefix(between(three, user, assistant), user_close, "assistant turn")
        no_system = cut_suffix(three[: three.index(user)], user_open, "first user turn")
        with_system = text([s, u])
        system_open = with_system[: with_system.index(_SYSTEM)]
        system_close = cut_suffix(between(with_system, _SYSTEM, user), user_open, "system turn")
        one = text([u])
        generation = cut_prefix(text([u], generation=True), one, "generation prompt")
    except ValueError as err:  # a marker the template did not write as given
        if isinstance(err, ModelfileError):
            raise
        raise ModelfileError(
            f"the chat template does not write message contents as given (it changes or drops them){UNFIT}"
        ) from None
    pieces = RolePieces(
        system_open,
        system_close,
        no_system,
        user_open,
        user_close,
        assistant_open,
        assistant_close,
        generation,
    )
    _check(pieces, tokenizer)
    return pieces


def _check(pieces: RolePieces, tokenizer) -> None:
    """The pieces rebuild the template's rendering of every shape of conversation the pipeline trains."""
    turns = [
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question?"},
        {"role": "assistant", "content": "Second answer."},
        {"role": "user", "content": "Third question?"},
    ]
    for system in (None, "A system prompt."):
        for n in range(1, len(turns) + 1):
            messages = with_system_prompt(turns[:n], system)
            generation = messages[-1]["role"] == "user"
            expected = render(tokenizer, messages, add_generation_prompt=generation)
            if pieces.render(messages, generation) != expected:
                roles = ", ".join(m["role"] for m in messages)
                raise ModelfileError(
                    f"the chat template renders the conversation ({roles}) differently from the pieces read "
                    f"off its other turns (its text depends on a message's position){UNFIT}"
                )


def go_template(pieces: RolePieces) -> str:
    """The pieces as an Ollama (Go text/template) TEMPLATE. No trim markers: every space and newline
    between the actions is one the chat template writes."""

    def literal(text: str) -> str:
        # "{{" in the text would start an action: write such text as a Go string constant instead
        return "{{ " + json.dumps(text) + " }}" if "{{" in text or "}}" in text else text

    return (
        "{{ if .System }}"
        + literal(pieces.system_open)
        + "{{ .System }}"
        + literal(pieces.system_close)
        + "{{ else }}"
        + literal(pieces.no_system)
        + "{{ end }}"
        + "{{ range .Messages }}"
        + '{{ if eq .Role "user" }}'
        + literal(pieces.user_open)
        + "{{ .Content }}"
        + literal(pieces.user_close)
        + '{{ else if eq .Role "assistant" }}'
        + literal(pieces.assistant_open)
        + "{{ .Content }}"
        + literal(pieces.assistant_close)
        + "{{ end }}"
        + "{{ end }}"
        + literal(pieces.generation)
    )


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise ModelfileError(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{value}"""'


def stop_sequences(tokenizer) -> list[str]:
    """Where Ollama must stop generating: the template's end-of-turn text and the eos token."""
    marker, _ = end_of_turn(tokenizer)
    stops = [marker.strip()] if marker.strip() else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def modelfile(gguf_name: str, tokenizer, system_prompt: str | None) -> str:
    """The Modelfile text: FROM the GGUF beside it, the template, its stop sequences, the system prompt."""
    lines = [
        "# Ollama: ollama create <name> -f Modelfile (run in this folder), then ollama run <name>",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quoted(go_template(role_pieces(tokenizer)), 'chat template')}",
    ]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_sequences(tokenizer)]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt, 'system prompt')}")
    return "\n".join(lines) + "\n"

"""Chat templates: which one a pipeline trains with, and the token that ends an assistant turn.

`format.chat_template` in the YAML picks the template:

- unset: the tokenizer's own template; a tokenizer without one gets `zephyr` (below), which ends
  every turn with the tokenizer's own end-of-sequence token, so generation stops where training
  taught the model to stop, whatever the vocabulary;
- a name from `NAMED_TEMPLATES`;
- a path ending in `.jinja`, relative to the project root;
- a Jinja string (anything containing `{{` or `{%`).

Every template must render incrementally: the messages up to an assistant turn, rendered with the
generation prompt, are a prefix of the whole conversation's text. The loss mask depends on it.
The resolved text is stored with the dataset, the adapter and the published model, so serving
renders exactly what training saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

ZEPHYR = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "zephyr": ZEPHYR, "alpaca": ALPACA}
"""Templates loraflow ships, by name. `chatml`: <|im_start|>role ... <|im_end|> (Qwen, SmolLM2 and
many others). `zephyr`: <|role|> headers, each turn ended by the tokenizer's eos token. `alpaca`:
### Instruction / ### Response sections, each answer ended by the eos token."""

DEFAULT_TEMPLATE = "zephyr"
"""Used when the YAML names no template and the tokenizer has none of its own."""

_PROBE_ANSWER = "Probe answer 7f3a."


class TemplateError(ValueError):
    """A chat template that cannot be found, parsed or used for loss masking."""


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_jinja(source: str) -> None:
    """Parse a template the way transformers will, so a syntax error surfaces at spec load."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except TemplateSyntaxError as err:
        raise TemplateError(f"not a valid Jinja template (line {err.lineno}: {err.message})") from None


def resolve_template(choice: str | None, tokenizer, root: Path | None = None) -> tuple[str, str]:
    """(template text, where it came from) for a `format.chat_template` value and a tokenizer."""
    if choice is None:
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one is what chat serving uses
            own = own.get("default")
        if own:
            return own, "tokenizer"
        return NAMED_TEMPLATES[DEFAULT_TEMPLATE], f"{DEFAULT_TEMPLATE} (the tokenizer has no template)"
    if choice in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[choice], choice
    if is_jinja(choice):
        check_jinja(choice)
        return choice, "inline Jinja"
    if choice.endswith(".jinja"):
        path = Path(choice).expanduser()
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        if not path.is_file():
            raise TemplateError(f"format.chat_template: no template file at {path}")
        text = path.read_text(encoding="utf-8")
        try:
            check_jinja(text)
        except TemplateError as err:
            raise TemplateError(f"format.chat_template: {path}: {err}") from None
        return text, str(path)
    raise TemplateError(
        f"format.chat_template {choice!r} is not a known name ({', '.join(NAMED_TEMPLATES)}), "
        "a .jinja file or a Jinja string"
    )


def end_of_turn(tokenizer) -> tuple[str, int | None]:
    """The text the template puts after an assistant's answer, and its last token id.

    (`"<|im_end|>"`, its id) for ChatML. The id is None when the template adds nothing after an
    answer: a model trained with it never learns where an answer ends.
    """
    from loraflow.formatting import assistant_spans

    messages = [
        {"role": "user", "content": "Probe question?"},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ]
    text, spans = assistant_spans(tokenizer, messages)
    start, end = spans[-1]
    answer_at = text.find(_PROBE_ANSWER, start)
    if answer_at < 0 or answer_at + len(_PROBE_ANSWER) > end:
        raise TemplateError("the chat template does not write the assistant's answer as given")
    marker = text[answer_at + len(_PROBE_ANSWER) : end]
    if not marker.strip():
        return marker, None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return marker, ids[-1] if ids else None


@contextmanager
def using_template(tokenizer, template: str) -> Iterator:
    """The tokenizer with `template` as its chat template for the block, restored afterwards."""
    before = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = before

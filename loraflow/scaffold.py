"""The YAML of a new fine-tune, written from the spec itself: every key the spec has, commented out at
its default with the first line of its docstring, and a data source to fill in.

Generated rather than kept as a template file, so that a key added to the spec is in the next
scaffold with its documentation, and a scaffolded file can never name a key the spec dropped.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from loraflow.spec import DataSpec, PipelineAttributes, SourceSpec, spec_json_schema

INDENT = "  "


def _first_line(text: str | None) -> str:
    line = (text or "").strip().split("\n\n")[0].replace("\n", " ")
    return line if len(line) <= 100 else line[:97].rsplit(" ", 1)[0] + " ..."


def _is_section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default(field) -> Any:
    if field.default_factory is not None:
        value = field.default_factory()
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return None if field.default is PydanticUndefined else field.default


def _yaml_value(value: Any) -> str:
    """A default as one line of YAML (flow style), e.g. `[q_proj, v_proj]`, `{}`, `null`, `0.0002`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = value and value.strip() == value and not any(c in value for c in ":#{}[],&*!|>'\"%@`")
        return value if plain and value not in ("true", "false", "null", "yes", "no") else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _choices(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    return ""


def _section(model: type[BaseModel], depth: int) -> list[str]:
    lines = []
    pad = INDENT * depth
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        doc = _first_line(field.description)
        choices = _choices(field.annotation)
        sub = _is_section(field.annotation)
        if doc:
            lines.append(f"{pad}# {doc}" + (f" ({choices})" if choices else ""))
        if sub is not None:
            lines.append(f"{pad}# {name}:")
            lines.extend(_section(sub, depth + 1))
        else:
            lines.append(f"{pad}# {name}: {_yaml_value(_default(field))}")
    return lines


def scaffold_text(name: str, component_type: str, schema: str | None = None) -> str:
    """The `defs.yaml` of a new fine-tune named `name`: loads as it is (one source, data/<name>/*.jsonl),
    with every other key of the spec documented and commented out at its default."""
    header = [f"# yaml-language-server: $schema={schema}"] if schema else []
    source_fields = {k: f for k, f in SourceSpec.model_fields.items() if k != "path"}
    lines = [
        *header,
        f"# The fine-tune {name!r}. Uncomment a key to change it; `dg check defs` checks the file.",
        f"type: {component_type}",
        "",
        "attributes:",
        f"{INDENT}# {_first_line(PipelineAttributes.model_fields['description'].description)}",
        f"{INDENT}description: ''",
        "",
        f"{INDENT}# {_first_line(PipelineAttributes.model_fields['data'].description)}",
        f"{INDENT}data:",
        f"{INDENT * 2}# {_first_line(DataSpec.model_fields['sources'].description)}",
        f"{INDENT * 2}sources:",
        f"{INDENT * 3}# {_first_line(SourceSpec.model_fields['path'].description)}",
        f"{INDENT * 3}- path: data/{name}/*.jsonl",
    ]
    for key, field in source_fields.items():
        lines.append(f"{INDENT * 4}# {_first_line(field.description)}")
        lines.append(f"{INDENT * 4}# {key}: {_yaml_value(_default(field))}")
    others = [(k, f) for k, f in DataSpec.model_fields.items() if k != "sources"]
    for key, field in others:
        lines.append(f"{INDENT * 2}# {_first_line(field.description)}")
        lines.append(f"{INDENT * 2}# {key}: {_yaml_value(_default(field))}")
    for key, field in PipelineAttributes.model_fields.items():
        if key in ("description", "data"):
            continue
        lines.append("")
        sub = _is_section(field.annotation)
        doc = _first_line(field.description)
        choices = _choices(field.annotation)
        lines.append(f"{INDENT}# {doc}" + (f" ({choices})" if choices else ""))
        if sub is not None:
            lines.append(f"{INDENT}# {key}:")
            lines.extend(_section(sub, 2))
        else:
            lines.append(f"{INDENT}# {key}: {_yaml_value(_default(field))}")
    return "\n".join(lines) + "\n"


def schema_text() -> str:
    """The JSON schema of a fine-tune file as committed in `pipelines/finetune.schema.json`."""
    return json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m loraflow.scaffold schema > pipelines/finetune.schema.json` after a spec change."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m loraflow.scaffold", description=main.__doc__)
    parser.add_argument("what", choices=["schema"], help="schema: the JSON schema of a fine-tune file")
    parser.parse_args(argv)
    sys.stdout.write(schema_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

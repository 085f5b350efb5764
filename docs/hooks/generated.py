"""MkDocs hook: the pages generated from the code at build time, so they cannot drift from it.

- docs/configuration.md: `<!-- settings-table -->` becomes a table of `app.settings.Settings`'s
  fields (environment variable = field name upper-cased, default, type or allowed values, the
  field's `description=`).
- docs/http-reference.md: `<!-- openapi-routes -->` becomes every route of the app's OpenAPI
  schema (method, path, summary and description, parameters, request body fields, responses),
  rendered as Markdown: no Swagger UI, nothing loaded from another host.

The schema comes from `app.main.create_app(Settings()).openapi()`. Building the app loads nothing:
the models, the engine thread and the job stores start in its lifespan, which is never entered here.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_MARKER = "<!-- settings-table -->"
ROUTES_MARKER = "<!-- openapi-routes -->"
METHODS = ("get", "post", "put", "patch", "delete")


def _import_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def cell(text: Any) -> str:
    """One Markdown table cell: pipes escaped, newlines folded."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --- configuration -------------------------------------------------------------------------------


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_text(a) for a in rest) + " (optional)"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "bool": "boolean", "Path": "path"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _default_text(default: Any) -> str:
    if default is None or default == "":
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


def settings_table() -> str:
    _import_path()
    from app.settings import Settings

    rows = [
        "| variable | default | type or values | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        rows.append(
            f"| `{name.upper()}` | {_default_text(field.get_default(call_default_factory=True))} "
            f"| {_type_text(field.annotation)} | {cell(field.description or '')} |"
        )
    return "\n".join(rows)


# --- HTTP reference ------------------------------------------------------------------------------


def openapi_schema() -> dict[str, Any]:
    _import_path()
    from app.main import create_app
    from app.settings import Settings

    return create_app(Settings(_env_file=None)).openapi()


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_text(schema: dict[str, Any]) -> str:
    """A short type for a JSON schema: `string`, `array of Message`, `integer or null`, ..."""
    if not schema:
        return "any"
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#{name.lower()})"  # the schema's heading under "Schemas" below
    if "const" in schema:
        return f"`{schema['const']!r}`".replace("'", '"')
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(dict.fromkeys(type_text(s) for s in schema[key]))
    kind = schema.get("type")
    if kind == "array":
        return f"array of {type_text(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {type_text(schema['additionalProperties'])}"
    if isinstance(kind, list):
        return " or ".join(kind)
    return kind or "object"


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = components.get(_ref_name(schema["$ref"]), {})
    return schema


def fields_table(schema: dict[str, Any], components: dict[str, Any]) -> list[str]:
    schema = _resolve(schema, components)
    props = schema.get("properties")
    if not props:
        return [f"Body: {type_text(schema)}."]
    required = set(schema.get("required", ()))
    lines = ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for name, prop in props.items():
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        lines.append(
            f"| `{name}` | {cell(type_text(prop))} | {'yes' if name in required else ''} "
            f"| {cell(default)} | {cell(prop.get('description', ''))} |"
        )
    return lines


def route_markdown(path: str, method: str, op: dict[str, Any], components: dict[str, Any]) -> list[str]:
    out = [f"### `{method.upper()} {path}`", ""]
    if op.get("summary"):
        out += [f"**{op['summary']}**", ""]
    if op.get("description"):
        out += [op["description"].strip(), ""]
    params = op.get("parameters", [])
    if params:
        out += [
            "Parameters:",
            "",
            "| name | in | type | required | default | description |",
            "|---|---|---|---|---|---|",
        ]
        for p in params:
            schema = p.get("schema", {})
            default = f"`{json.dumps(schema['default'])}`" if "default" in schema else ""
            required = "yes" if p.get("required") else ""
            out.append(
                f"| `{p['name']}` | {p['in']} | {cell(type_text(schema))} | {required} "
                f"| {cell(default)} | {cell(p.get('description', ''))} |"
            )
        out.append("")
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            name = f" ({type_text(schema)})" if "$ref" in schema else ""
            out += [f"Request body, `{media}`{name}:", ""]
            out += fields_table(schema, components)
            out.append("")
    responses = op.get("responses", {})
    if responses:
        out += ["Responses:", ""]
        for status, resp in responses.items():
            kinds = []
            for media, content in resp.get("content", {}).items():
                schema = content.get("schema", {})
                kinds.append(f"`{media}`" + (f" {type_text(schema)}" if schema else ""))
            extra = f" ({', '.join(kinds)})" if kinds else ""
            out.append(f"- **{status}**: {cell(resp.get('description', ''))}{extra}")
        out.append("")
    return out


# Sections of the reference, by a path's first segment (the lens that serves it); the guide for each.
SECTIONS = {
    "generate_lda": ("LDA generation", "lda.md"),
    "generate_lda_batch": ("LDA generation", "lda.md"),
    "generate": ("LDA generation", "lda.md"),
    "adapters": ("Adapters and amplification", "amplification.md"),
    "amplification": ("Adapters and amplification", "amplification.md"),
    "weightdiff": ("Weight-diff jobs", "weight-diffs.md"),
    "dit": ("DIT interpreter", "dit.md"),
    "diffing": ("Diffing jobs", "diffing.md"),
    "experiments": ("Experiments", "experiments.md"),
    "v1": ("OpenAI- and vLLM-compatible routes", "openai.md"),
    "tokenize": ("OpenAI- and vLLM-compatible routes", "openai.md"),
    "detokenize": ("OpenAI- and vLLM-compatible routes", "openai.md"),
    "tokenizer_info": ("OpenAI- and vLLM-compatible routes", "openai.md"),
}
SYSTEM = ("System: health, readiness, information, metrics", "lda.md")


def section_of(path: str) -> tuple[str, str]:
    return SECTIONS.get(path.strip("/").split("/")[0], SYSTEM)


def routes_markdown(schema: dict[str, Any]) -> str:
    components = schema.get("components", {}).get("schemas", {})
    groups: dict[tuple[str, str], list[str]] = {}
    index = ["| method | path | summary |", "|---|---|---|"]
    for path, item in schema["paths"].items():
        for method in METHODS:
            if method in item:
                op = item[method]
                groups.setdefault(section_of(path), []).extend(route_markdown(path, method, op, components))
                index.append(f"| {method.upper()} | `{path}` | {cell(op.get('summary', ''))} |")
    out = ["## All routes", "", *index, ""]
    for (title, guide), lines in groups.items():
        out += [f"## {title}", "", f"In use: the [guide]({guide}).", "", *lines]
    out += ["## Schemas", "", "The request and response bodies the routes above name.", ""]
    for name, comp in components.items():
        out += [f"### {name}", ""]
        if comp.get("description"):
            out += [comp["description"].strip(), ""]
        out += fields_table(comp, components)
        out.append("")
    return "\n".join(out)


# --- the hook ------------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_table())
    if ROUTES_MARKER in markdown:
        markdown = markdown.replace(ROUTES_MARKER, routes_markdown(openapi_schema()))
    return markdown


if __name__ == "__main__":  # python docs/hooks/generated.py: print both, for a look without mkdocs
    print(settings_table())
    print(routes_markdown(openapi_schema()))

"""The recipe form, generated from the recipe schema itself (afina.config): every field with its default,
its help text and an input that fits its type; submitted values become a recipe validated exactly as the
CLI validates one, and its problems come back keyed by field with the CLI's own messages."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from afina.config import Recipe, format_validation_error, recipe_problems
from afina.studio.paths import StudioError

# Lists of sections: edited as YAML text (a form per item would be a second schema).
YAML_SECTIONS = ("stages", "data.sources")


@dataclass
class FormField:
    key: str  # dotted recipe key, e.g. training.learning_rate
    kind: str  # bool | choice | number | text | yaml
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False

    def shown(self, value: Any) -> str:
        """A value as the input shows it."""
        if value is None:
            return ""
        if self.kind == "yaml":
            if isinstance(value, (str, int, float)):
                return str(value)
            return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        if self.kind == "bool":
            return "true" if value else "false"
        return str(value)


@dataclass
class FormSection:
    key: str
    help: str
    fields: list[FormField]
    sections: list[FormSection]


def _kind(annotation: Any) -> tuple[str, tuple[str, ...], bool]:
    """(input kind, choices, optional) for a field's type."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    optional = False
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            kind, choices, _ = _kind(rest[0])
            return kind, choices, optional
        if set(rest) == {bool} | {r for r in rest if typing.get_origin(r) is Literal}:  # bool | Literal["auto"]
            extra = tuple(str(v) for r in rest if typing.get_origin(r) is Literal for v in typing.get_args(r))
            return "choice", ("true", "false", *extra), optional
        return "yaml", (), optional
    if origin is Literal:
        return "choice", tuple(str(a) for a in args), optional
    if annotation is bool:
        return "bool", (), optional
    if annotation in (int, float):
        return "number", (), optional
    if annotation is str:
        return "text", (), optional
    return "yaml", (), optional


def _section_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def build_form(model: type[BaseModel] = Recipe, prefix: str = "") -> FormSection:
    fields: list[FormField] = []
    sections: list[FormSection] = []
    for name, info in model.model_fields.items():
        key_name = info.alias or name
        key = f"{prefix}.{key_name}" if prefix else key_name
        default = info.get_default(call_default_factory=True)
        section = _section_class(info.annotation)
        if section is not None and key not in YAML_SECTIONS:
            child = build_form(section, key)
            child.help = info.description or (section.__doc__ or "").split("\n")[0]
            sections.append(child)
            continue
        kind, choices, optional = _kind(info.annotation)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json", by_alias=True)
        fields.append(FormField(key, kind, default, info.description or "", choices, optional))
    return FormSection(prefix, model.__doc__ or "", fields, sections)


def all_fields(section: FormSection) -> dict[str, FormField]:
    out = {f.key: f for f in section.fields}
    for child in section.sections:
        out.update(all_fields(child))
    return out


FORM = build_form()
FIELDS = all_fields(FORM)


def parse_value(key: str, raw: Any) -> Any:
    """A submitted value as the recipe holds it: text stays text, the rest is read as YAML (as overrides are)."""
    field = FIELDS.get(key)
    if not isinstance(raw, str):
        return raw
    if field is not None and (field.kind == "text" or (field.kind == "choice" and raw not in ("true", "false"))):
        return None if raw == "" and field.optional else raw
    if field is not None and raw.strip() == "" and field.optional:
        return None
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw
    if field is not None and field.kind == "number" and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as text; a number field means the number
            return float(value)
        except ValueError:
            return value
    return value


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def field_of(key: str) -> str:
    """The form field a problem's key belongs to (a union's member, e.g. `method.target_modules.list[str]`,
    belongs to `method.target_modules`)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FIELDS:
            return ".".join(parts[:end])
    return key


def recipe_from_values(values: dict[str, Any], source: str) -> tuple[Recipe, dict[str, Any]]:
    """(validated recipe, the recipe's own keys as given) or a 422 naming every field that is wrong."""
    data: dict[str, Any] = {}
    for key, raw in values.items():
        set_key(data, key, parse_value(key, raw))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = [{"field": field_of(key), "message": message} for key, message in recipe_problems(err)]
        raise StudioError(422, format_validation_error(err, source), problems) from None
    return recipe, data

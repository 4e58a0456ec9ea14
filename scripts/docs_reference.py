"""The docs site's reference pages, generated from the code at build time so they cannot drift from it.

`reference/recipe.md`: every recipe key with its type, default, allowed values and description, read from the
pydantic schema (`afina.config.Recipe`). `reference/cli.md`: every command, subcommand and flag with its help,
read from the argparse parser (`afina.cli.build_parser`).

mkdocs runs this file as a hook (`hooks:` in mkdocs.yml): `on_files` adds the two pages to the site without
writing them into docs/. `python scripts/docs_reference.py OUT_DIR` writes them as files, to read or diff.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

RECIPE_PAGE = "reference/recipe.md"
CLI_PAGE = "reference/cli.md"


# --- the recipe schema -------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `int | None`, `list[str]`, `one of ...`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (list, tuple, set):
        return f"list[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _allowed(field: FieldInfo) -> str:
    """Bounds (ge, gt, le, lt, min_length, pattern) from the field's metadata."""
    words = []
    for item in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"`{symbol} {value}`")
        if getattr(item, "min_length", None) is not None:
            words.append(f"at least {item.min_length} item(s)")
        if getattr(item, "pattern", None) is not None:
            words.append(f"matches `{item.pattern}`")
    return ", ".join(words)


def _section_classes(annotation: Any) -> list[type[BaseModel]]:
    """The sections a field holds: a section, an optional section, or a list of sections."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for a in typing.get_args(annotation) for c in _section_classes(a)]


def recipe_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """Every key of the recipe schema, dotted (`training.learning_rate`; items of a list of sections as `N`)."""
    if model is None:
        from afina.config import Recipe

        model = Recipe
    keys: list[tuple[str, FieldInfo]] = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        keys.append((key, field))
        for section in _section_classes(field.annotation):
            is_list = typing.get_origin(field.annotation) is list
            keys.extend(recipe_keys(section, key + (".N." if is_list else ".")))
    return keys


def _cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, and `<...>` outside code spans shown, not read as HTML."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def recipe_reference() -> str:
    """The recipe reference page (Markdown)."""
    lines = [
        "# Recipe reference",
        "",
        "Every key of a recipe, generated from the schema in `src/afina/config.py` when the site is built.",
        "Set a key in the YAML file, or on the command line as `key.sub=value` "
        "(e.g. `afina train recipe.yaml training.epochs=2`); `afina config show RECIPE` prints a recipe with "
        "every default filled in. An unknown key, a wrong type or a value out of range stops with a message "
        "naming the key. Keys under `stages.N.` and `data.sources.N.` belong to each item of those lists.",
        "",
    ]
    keys = recipe_keys()
    sections = [k for k, f in keys if _section_classes(f.annotation) and "." not in k]
    top = [(k, f) for k, f in keys if "." not in k and k not in sections]
    fields_of = dict(keys)
    groups: list[tuple[str, str, list[tuple[str, FieldInfo]]]] = [("Top level", "", top)]
    for section in sections:
        doc = _section_classes(fields_of[section].annotation)[0].__doc__ or ""
        groups.append((f"`{section}`", " ".join(doc.split()), [(k, f) for k, f in keys if k.startswith(section + ".")]))
    for title, doc, fields in groups:
        lines += [f"## {title}", ""] + ([doc, ""] if doc else [])
        lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for key, field in fields:
            kind = (
                "section" if _section_classes(field.annotation) and typing.get_origin(field.annotation) is None else ""
            )
            lines.append(
                "| "
                + " | ".join(
                    _cell(cell)
                    for cell in (
                        f"`{key}`",
                        kind or _type_name(field.annotation),
                        _default(field),
                        _allowed(field),
                        field.description or "",
                    )
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


# --- the command line ----------------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """{name: (one-line help, parser)} of a parser's subcommands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), p) for name, p in action.choices.items()}
    return {}


def cli_commands(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> list[str]:
    """Every command and subcommand, as typed: `prepare`, `data from-logs`, `config show`, ..."""
    if parser is None:
        from afina.cli import build_parser

        parser = build_parser()
    names = []
    for name, (_, sub) in _subcommands(parser).items():
        names.append(prefix + name)
        names += cli_commands(sub, prefix + name + " ")
    return names


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) if action.option_strings else action.dest
        if action.option_strings and action.nargs != 0:
            name += " " + (action.metavar or action.dest.upper())
        elif not action.option_strings and action.nargs in ("*", "?"):
            name = f"[{name}{' ...' if action.nargs == '*' else ''}]"
        details = []
        if action.choices:
            details.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        if action.required and action.option_strings:
            details.append("required")
        text = (action.help or "").replace("%%", "%") % {"prog": "afina"} if action.help else ""
        rows.append(f"| `{_cell(name)}` | {_cell(text)}{' (' + '; '.join(details) + ')' if details else ''} |")
    return rows


def _command_section(name: str, summary: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `afina {name}`", ""]
    description = parser.description or summary
    lines += [description.replace("%%", "%"), "", "```", parser.format_usage().strip(), "```", ""]
    rows = _option_rows(parser)
    if rows:
        lines += ["| argument | meaning |", "|---|---|", *rows, ""]
    for sub_name, (sub_summary, sub) in _subcommands(parser).items():
        lines += _command_section(f"{name} {sub_name}", sub_summary, sub, level + 1)
    return lines


def cli_reference() -> str:
    """The command-line reference page (Markdown)."""
    from afina.cli import build_parser

    parser = build_parser()
    lines = [
        "# Command reference",
        "",
        "Every `afina` command and flag, generated from the parser in `src/afina/cli.py` when the site is built "
        "(`afina COMMAND --help` prints the same).",
        "",
        "```",
        parser.format_usage().strip(),
        "```",
        "",
        "| argument | meaning |",
        "|---|---|",
        *_option_rows(parser),
        "",
    ]
    for name, (summary, sub) in _subcommands(parser).items():
        lines += _command_section(name, summary, sub, 2)
    return "\n".join(lines)


# --- mkdocs hook -------------------------------------------------------------------------------------------------


def on_files(files, config):  # mkdocs hook: add the generated pages
    from mkdocs.structure.files import File

    for uri, content in ((RECIPE_PAGE, recipe_reference()), (CLI_PAGE, cli_reference())):
        files.append(File.generated(config, uri, content=content))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-reference")
    for uri, content in ((RECIPE_PAGE, recipe_reference()), (CLI_PAGE, cli_reference())):
        path = out / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        print(path)

"""The README and the docs site say what the code does: every command the README lists exists, and the
generated reference pages list every recipe key and every command and flag."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from afina.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _reference_module():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_commands() -> list[str]:
    """The commands of the README's `## Commands` code block, as typed after `afina`."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].split()[1:] for line in block.splitlines() if line.startswith("afina ")]


def test_every_command_in_the_readme_exists():
    known = set(_reference_module().cli_commands())
    commands = readme_commands()
    assert len(commands) >= 15
    for words in commands:
        # `afina data from-logs ...`: the longest known command the line starts with.
        typed = [" ".join(words[:n]) for n in (2, 1) if len(words) >= n]
        assert any(t in known for t in typed), f"README lists `afina {' '.join(words)}`, not a command of afina"


def test_every_command_in_the_readme_parses():
    """Each listed command line is accepted by the parser as written (arguments and flags included)."""
    parser = build_parser()
    for words in readme_commands():
        try:
            parser.parse_args(words)
        except SystemExit as exc:  # argparse reports a bad command line by exiting
            pytest.fail(f"`afina {' '.join(words)}` does not parse (exit {exc.code})")


def test_readme_is_the_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    for link in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_recipe_reference_lists_every_key():
    reference = _reference_module()
    page = reference.recipe_reference()
    keys = [key for key, _ in reference.recipe_keys()]
    for key in ("training.learning_rate", "data.schema", "stages.N.replay", "data.sources.N.task"):
        assert key in keys
    for key in keys:
        # A key is a row of its section's table; a top-level section is a heading of its own.
        assert f"| `{key}` |" in page or f"## `{key}`" in page, f"{key} is missing from the recipe reference"


def test_recipe_reference_shows_type_default_and_allowed_values():
    page = _reference_module().recipe_reference()
    row = next(line for line in page.splitlines() if line.startswith("| `training.optimizer` |"))
    assert "`adamw_8bit`" in row and '`"adamw"`' in row
    row = next(line for line in page.splitlines() if line.startswith("| `method.r` |"))
    assert "int" in row and "`16`" in row and ">= 1" in row and "<= 1024" in row


def test_cli_reference_lists_every_command_and_flag():
    reference = _reference_module()
    page = reference.cli_reference()
    for command in reference.cli_commands():
        assert f"`afina {command}`" in page, f"afina {command} is missing from the command reference"
    parser = build_parser()
    for name, (_, sub) in reference._subcommands(parser).items():
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, f"afina {name} {flag} is missing from the command reference"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_docs_site_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = (tmp_path / "site" / "reference" / "recipe" / "index.html").read_text()
    assert "training.learning_rate" in recipe

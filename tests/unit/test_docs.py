"""User docs stay in step with the code: the README's command table is the CLI's command list,
the README stays short, every relative link of the top-level Markdown files resolves in a
clone, and user docs carry no issue numbers (history belongs in CHANGELOG.md)."""

from __future__ import annotations

import pathlib
import re

import pytest

from tfm_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_command_table_is_the_cli():
    text = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(tfm-jax [a-z -]+)` \|", text, flags=re.M))
    commands = {"tfm-jax " + " ".join(c.name) for c in cli.COMMANDS}
    assert listed == commands, (f"README lists {sorted(listed - commands)} that the CLI lacks; "
                                f"the CLI has {sorted(commands - listed)} that README lacks")


def test_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md", "CLAIMS.md"])
def test_relative_links_resolve(name):
    path = ROOT / name
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        if file and not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{name}: links that do not resolve in a clone: {broken}"


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_carry_no_issue_numbers_or_dates(path):
    hits = re.findall(r"(?i)\bissues? #?\d+|\(#\d+\)|\b20\d\d-\d\d-\d\d\b", path.read_text())
    assert not hits, f"{path.name}: {hits} (history goes to CHANGELOG.md)"


def test_every_config_key_is_described():
    """The configuration reference (docs/gen_config_reference.py) is generated from the
    pydantic Field descriptions: none may be empty."""
    from tfm_jax.config import Config

    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if hasattr(field.annotation, "model_fields"):
                walk(field.annotation, f"{prefix}{name}.")
            elif not field.description:
                missing.append(prefix + name)

    walk(Config, "")
    assert not missing, f"config keys without a Field description: {missing}"

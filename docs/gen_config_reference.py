"""Build-time pages of the docs site (run by the mkdocs-gen-files plugin, see mkdocs.yml).

* ``reference/config.md``: every configuration key, generated from the pydantic schema
  (``tfm_jax.config.Config``): name, type, default and the ``Field`` description, one table per
  section. The schema is the single source: a key added there appears here on the next build.
* ``notebooks/*.ipynb``: the repository's notebooks, copied into the site's sources so that
  mkdocs-jupyter renders them (stored without outputs; not executed at build time).

Run by hand to print the reference: ``python docs/gen_config_reference.py``.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _type_name(ann: Any) -> str:
    """A short, readable spelling of a field's annotation."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" if not isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        s = " \\| ".join(parts)
        return s + " \\| null" if type(None) in args else s
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple, dict, set):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        if len(str(value)) > 60:
            return f"{len(value)} entries (see below)"
        return f"`{[list(v) if isinstance(v, tuple) else v for v in value]}`"
    return f"`{value}`"


_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`]+)`")


def _escape_html(s: str) -> str:
    """``<name>`` outside code spans would be read as an HTML tag: escape it there."""
    parts = s.split("`")
    for i in range(0, len(parts), 2):                   # even parts are outside backticks
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _text(s: str | None) -> str:
    """reST roles and double backticks to Markdown; one line; table-safe."""
    if not s:
        return ""
    s = _ROLE.sub(r"`\1`", s)
    s = s.replace("``", "`")
    s = " ".join(s.split())
    return _escape_html(s).replace("|", "\\|")


def _doc(cls: type) -> str:
    """A section class's docstring with reST markup turned into Markdown (paragraphs kept)."""
    import inspect

    doc = inspect.getdoc(cls) or ""
    if not doc or doc == inspect.getdoc(BaseModel):
        return ""
    doc = _escape_html(_ROLE.sub(r"`\1`", doc).replace("``", "`"))
    return doc.replace("\n* ", "\n\n* ") if "\n* " in doc else doc


def _long_defaults(section: str, cls: type[BaseModel]) -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        if field.default_factory is None:
            continue
        value = field.default_factory()
        if isinstance(value, (list, tuple)) and len(str(value)) > 60:
            out.append(f"Default of `{section}.{name}`:\n")
            out.append("```yaml")
            for v in value:
                v = list(v) if isinstance(v, tuple) else v
                out.append(f"- {v}".replace("None", "null").replace("'", ""))
            out.append("```\n")
    return out


def config_reference() -> str:
    from tfm_jax.config import Config

    lines = [
        "# Configuration reference",
        "",
        "Every key of a run's configuration, generated from the pydantic schema "
        "(`tfm_jax.config.Config`) when this site is built: the type, the default and the "
        "description each `Field` declares. Set a key in a YAML file (`section: {key: value}`) "
        "or on the command line as `section.key=value`; `tfm-jax config show` prints the "
        "resolved values of a config. Cross-field rules (e.g. `model.n_heads % "
        "model.n_kv_heads == 0`) are checked when a config is loaded and are described in "
        "[Configuration](../configuration.md).",
        "",
    ]
    for section, field in Config.model_fields.items():
        cls = field.annotation
        if not _is_section(cls):
            continue
        lines += [f"## `{section}`", ""]
        doc = _doc(cls)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, f in cls.model_fields.items():
            lines.append(f"| `{section}.{name}` | {_type_name(f.annotation)} | {_default(f)} "
                         f"| {_text(f.description)} |")
        lines.append("")
        lines += _long_defaults(section, cls)
    return "\n".join(lines) + "\n"


def main() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open("reference/config.md", "w") as fh:
        fh.write(config_reference())
    mkdocs_gen_files.set_edit_path("reference/config.md", "gen_config_reference.py")

    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        with mkdocs_gen_files.open(f"notebooks/{nb.name}", "w") as fh:
            fh.write(nb.read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.stdout.write(config_reference())
else:
    main()

"""Jinja prompt templates: sandboxed, strict, hashed, and checked against a stage's fields before any model loads.

Web text (alt-text, captions) reaches a template only as variable *values*; Jinja never evaluates
``{{ ... }}`` found inside a value, and the sandbox stops a template from reaching Python internals.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from m3t_gen.resources import find_file


class TemplateError(Exception):
    pass


def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    path: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    @cached_property
    def _compiled(self) -> jinja2.Template:
        # Compiled once per template object: compiling on every render cost ~1 ms per row (measured), as much
        # as a tenth of a tiny model's generation time.
        return _environment().from_string(self.source)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}  # compiled code does not pickle

    def render(self, **fields: Any) -> str:
        try:
            return self._compiled.render(**fields).strip()
        except jinja2.UndefinedError as e:
            raise TemplateError(f"template {self.name}: {e.message}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"template {self.name}: {e}") from None


def load_template(name: str, base_dir: str | Path | None = None) -> PromptTemplate:
    path = find_file(name, "prompts", base_dir)
    source = path.read_text()
    try:
        _environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {name}: line {e.lineno}: {e.message}") from None
    return PromptTemplate(name=name, path=str(path), source=source)


def check_template(template: PromptTemplate, example_fields: dict[str, Any]) -> None:
    """Every name and attribute the template uses, in every branch (not only those the example takes), must be
    one the stage provides; then it must render against example values of exactly those fields."""
    _check_names(template, example_fields)
    out = template.render(**example_fields)
    if not out.strip():
        raise TemplateError(f"template {template.name}: renders to an empty prompt")


def _check_names(template: PromptTemplate, fields: dict[str, Any]) -> None:
    from jinja2 import meta, nodes

    env = _environment()
    ast = env.parse(template.source)
    unknown = sorted(meta.find_undeclared_variables(ast) - set(fields) - set(env.globals))
    if unknown:
        raise TemplateError(f"template {template.name}: uses {', '.join(unknown)}, which the stage does not provide")
    # What a name stands for: a field's example value, or for a loop variable over a list field, its first item.
    values: dict[str, Any] = dict(fields)
    for loop in ast.find_all(nodes.For):
        if isinstance(loop.target, nodes.Name) and isinstance(loop.iter, nodes.Name):
            items = fields.get(loop.iter.name)
            if isinstance(items, list) and items and isinstance(items[0], dict):
                values.setdefault(loop.target.name, items[0])
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node
        attr = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if not isinstance(base, nodes.Name) or not isinstance(attr, str):
            continue
        value = values.get(base.name)
        if isinstance(value, dict) and attr not in value:
            raise TemplateError(f"template {template.name}: line {node.lineno}: {base.name}.{attr} does not exist "
                                f"({base.name} has {', '.join(sorted(value))})")

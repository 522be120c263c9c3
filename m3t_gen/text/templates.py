"""Jinja prompt templates: sandboxed, strict, hashed, and checked against a stage's fields before any model loads.

Web text (alt-text, captions) reaches a template only as variable *values*; Jinja never evaluates
``{{ ... }}`` found inside a value, and the sandbox stops a template from reaching Python internals.

A template is one file: ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are refused (none of the
bundled prompts uses them, and they would read files past the confinement ``validate`` checks), and what a
template can make is bounded (``range``, ``*``, ``**``, ``%``, the padding filters, the rendered prompt), so a
template never takes the process's memory or time. Any failure of a template is a ``TemplateError``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from m3t_gen.bundled import find_file

# Far above any prompt (a model's context is some 10^5 tokens), far below what hurts the process.
MAX_PROMPT_CHARS = 1_000_000
MAX_RANGE = 10_000           # items one range() makes: prompts loop over turns and modifications, a few dozen
MAX_EXPONENT = 1_000         # 10 ** 1000 is 1,000 digits; 10 ** 10 ** 9 would never finish
_FORMAT_WIDTH = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")
_FILE_TAGS = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "import",
              nodes.Extends: "extends"}


class TemplateError(Exception):
    pass


def _too_big(what: str) -> SecurityError:
    return SecurityError(f"{what} (a prompt template's bound)")


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _too_big(f"range() of {len(r)} items, more than {MAX_RANGE}")
    return r


def _check_format(spec: Any) -> None:
    """``"%09999999d" % 1`` makes a string of the width it asks for: widths and precisions are bounded."""
    if isinstance(spec, str):
        for width, precision in _FORMAT_WIDTH.findall(spec):
            if max(int(width or 0), int(precision or 0)) > MAX_PROMPT_CHARS:
                raise _too_big(f"format width {max(int(width or 0), int(precision or 0))}, more than {MAX_PROMPT_CHARS}")


def _bounded_filter(name: str, size_args: tuple[int, ...]) -> Any:
    """Jinja's filter ``name`` with the arguments at ``size_args`` (a width) bounded, and formats checked."""
    base = jinja2.filters.FILTERS[name]

    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "format":
            _check_format(value)
        for i in size_args:
            if i < len(args) and isinstance(args[i], int) and args[i] > MAX_PROMPT_CHARS:
                raise _too_big(f"{name}({args[i]}): a width over {MAX_PROMPT_CHARS}")
        return base(value, *args, **kwargs)
    return bounded


class _PromptSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the operators that can make huge values bounded (intercepting them also
    stops Jinja from folding ``10 ** 10 ** 9`` at compile time)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and right > MAX_EXPONENT \
                and isinstance(left, (int, float)) and abs(left) > 1:
            raise _too_big(f"{left} ** {right}: an exponent over {MAX_EXPONENT}")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_PROMPT_CHARS:
                    raise _too_big(f"{len(seq)} items repeated {n} times: more than {MAX_PROMPT_CHARS}")
        if operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)


class _NoFiles(jinja2.BaseLoader):
    """Refuses every name: a prompt template is one file (load_template refuses the tags that would load one)."""

    def get_source(self, environment: Any, template: str) -> Any:
        raise SecurityError(f"{template!r}: a prompt template cannot load another file")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _PromptSandbox(
        loader=_NoFiles(),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["range"] = _bounded_range
    env.filters.update(center=_bounded_filter("center", (0,)), indent=_bounded_filter("indent", (0,)),
                       format=_bounded_filter("format", ()))
    return env


def _template_line(error: BaseException) -> str:
    """``line N: `` of the template where ``error`` was raised (Jinja maps its frames to template lines)."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"line {line}: " if line else ""


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
        """The prompt for ``fields``; every failure (an undefined name, a bound, a division by zero) is a
        TemplateError: at validate one line, in a run the rejection of that row."""
        try:
            return self._render(fields).strip()
        except jinja2.UndefinedError as e:
            raise TemplateError(f"template {self.name}: {_template_line(e)}{e.message}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"template {self.name}: {_template_line(e)}{e}") from None
        except Exception as e:  # noqa: BLE001  (the template's own arithmetic, filters, indexing)
            raise TemplateError(f"template {self.name}: {_template_line(e)}{type(e).__name__}: {e}") from None

    def _render(self, fields: dict[str, Any]) -> str:
        """Streamed, so a prompt that grows past MAX_PROMPT_CHARS stops there rather than after filling memory."""
        parts, size = [], 0
        for part in self._compiled.generate(**fields):
            size += len(part)
            if size > MAX_PROMPT_CHARS:
                raise _too_big(f"the prompt grows past {MAX_PROMPT_CHARS} characters")
            parts.append(part)
        return "".join(parts)


def load_template(name: str, base_dir: str | Path | None = None) -> PromptTemplate:
    path = find_file(name, "prompts", base_dir)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"template {name}: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    try:
        ast = _environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {name}: line {e.lineno}: {e.message}") from None
    for node in ast.find_all(tuple(_FILE_TAGS)):
        raise TemplateError(f"template {name}: line {node.lineno}: {{% {_FILE_TAGS[type(node)]} %}} is not "
                            f"supported (a prompt template is one file)")
    return PromptTemplate(name=name, path=str(path), source=source)


def check_template(template: PromptTemplate, example_fields: dict[str, Any]) -> None:
    """Every name and attribute the template uses, in every branch (not only those the example takes), must be
    one the stage provides; then it must render against example values of exactly those fields."""
    _check_names(template, example_fields)
    out = template.render(**example_fields)
    if not out.strip():
        raise TemplateError(f"template {template.name}: renders to an empty prompt")


def _check_names(template: PromptTemplate, fields: dict[str, Any]) -> None:
    from jinja2 import meta

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

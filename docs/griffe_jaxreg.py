"""Griffe extension for jaxreg's docstrings, applied before they are parsed.

* ``Example:`` is an examples section: griffe knows only ``Examples:`` and renders
  ``Example:`` as an admonition, where ``>>>`` lines become Markdown block quotes.
* reStructuredText math (``:math:`x```, ``.. math::`` blocks) becomes arithmatex math
  (``\\(x\\)``, ``$$ ... $$``), rendered by MathJax.
* A Sphinx cross-reference role (``:class:`Term```) left in a docstring is reported:
  write ``[`Term`][jaxreg.Term]`` (checked by ``mkdocs build --strict``) or plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::[ \t]*(.*)$")
_ROLE = re.compile(r":(class|func|meth|mod|attr|data|exc|obj|ref):`[^`]+`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        pad, first = m.group(1), m.group(2)
        body = [first] if first.strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += [pad + "$$", *(pad + b for b in body if b), pad + "$$", ""]
    return "\n".join(out)


def convert(text: str) -> str:
    """The docstring as griffe's Google parser and Markdown should see it."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _INLINE_MATH.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
    return _math_blocks(text)


class JaxregDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        value = obj.docstring.value
        for m in _ROLE.finditer(value):
            griffe.logger.warning(
                "%s: Sphinx role %s in a docstring: write a cross-reference "
                "[`Name`][jaxreg.path] or plain code",
                obj.path,
                m.group(0),
            )
        obj.docstring.value = convert(value)

"""Griffe extension: a Google-style ``Example:`` section is an examples section.

Griffe recognises ``Examples:`` only and renders ``Example:`` as an admonition, where
``>>>`` lines become Markdown block quotes. jaxreg's docstrings say ``Example:`` (as
Napoleon allows), so this renames the heading before the docstring is parsed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)

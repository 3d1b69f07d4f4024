"""The hand-written tables and signatures in docs/*.md match the code they describe."""

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jaxreg as jr

DOCS = Path(__file__).parents[1] / "docs"
_NO_DEFAULT = object()
_IDENT = re.compile(r"`([A-Za-z_]\w*)`")


def _table(markdown: str, first_header: str) -> list[list[str]]:
    """The rows (cells stripped) of the table whose header row starts with ``first_header``.

    Cells are split on ``|`` outside code spans (formulas such as ``|g|`` hold pipes).
    """
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells, cell, code = [], "", False
        for ch in line.strip()[1:-1]:
            if ch == "`":
                code = not code
            if ch == "|" and not code:
                cells.append(cell.strip())
                cell = ""
            else:
                cell += ch
        rows.append([*cells, cell.strip()])
    return rows


def _call(text: str) -> tuple[str, list[tuple[str, object]]]:
    """``"f(a, b=1, *, c=2)"`` -> ``("f", [("a", <none>), ("b", 1), ("c", 2)])``."""
    name, args = re.fullmatch(r"([\w.]+)\((.*)\)", text.strip(), re.S).groups()
    fn = ast.parse(f"def _({args}): pass").body[0].args
    positional = fn.posonlyargs + fn.args
    defaults = [_NO_DEFAULT] * (len(positional) - len(fn.defaults)) + [
        ast.literal_eval(d) for d in fn.defaults
    ]
    params = list(zip([a.arg for a in positional], defaults, strict=True))
    params += [
        (a.arg, _NO_DEFAULT if d is None else ast.literal_eval(d))
        for a, d in zip(fn.kwonlyargs, fn.kw_defaults, strict=True)
    ]
    return name, params


def _balanced_call(text: str, prefix: str) -> str:
    """The call ``prefix(...)`` in ``text``, up to its matching parenthesis."""
    start = text.index(prefix + "(")
    depth = 0
    for i in range(start + len(prefix), len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    raise AssertionError(f"unbalanced call {prefix}( in the docs")


def _signature(fn, skip=()) -> list[tuple[str, object]]:
    return [
        (p.name, _NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.name not in skip and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def _options(fn) -> set[str]:
    """A built-in term's options: its keyword-only parameters."""
    return {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _metrics(fn) -> set[str]:
    """The metric names a built-in term returns (traced only: nothing is compiled)."""
    x = -jnp.ones((2, 4))
    names = ("weights", "sampling_logprobs", "advantages", "ref_logprobs", "other")
    batch = jr.Batch(jnp.ones((2, 4)), {k: -jnp.ones((2, 4)) for k in names})
    options = {"other": "other"} if fn is jr.regularizers.consistency else {}
    _, metrics = jax.eval_shape(lambda x, b: fn(x, b, **options), x, batch)
    return set(metrics)


def _public_functions(module) -> set[str]:
    return {
        n
        for n, o in vars(module).items()
        if not n.startswith("_") and callable(o) and not isinstance(o, type)
    }


@pytest.mark.parametrize(
    "module, header, options_col",
    [(jr.losses, "term | formula (per real token", 3), (jr.regularizers, "term | formula |", 2)],
    ids=["losses", "regularizers"],
)
def test_terms_tables_match_the_signatures_and_metrics(module, header, options_col):
    markdown = (DOCS / "terms.md").read_text()
    section = markdown.index(f"(`{module.__name__}`)")
    rows = _table(markdown[section:], header)
    documented = {}
    for row in rows:
        (name,) = _IDENT.findall(row[0])
        documented[name] = row
    assert set(documented) == _public_functions(module)
    for name, row in documented.items():
        fn = getattr(module, name)
        options = set(_IDENT.findall(row[options_col]))
        assert options == _options(fn), f"{name}: docs/terms.md lists options {sorted(options)}"
        metrics = set(_IDENT.findall(row[-1]))
        assert metrics == _metrics(fn), f"{name}: docs/terms.md lists metrics {sorted(metrics)}"


@pytest.mark.parametrize(
    "module, header",
    [(jr.aggregators, "aggregator"), (jr.weighting, "weighting")],
    ids=["aggregators", "weighting"],
)
def test_optax_tables_name_every_parameter(module, header):
    rows = _table((DOCS / "optax.md").read_text(), f"{header} |")
    for row in rows:
        name, params = _call(row[0].strip("`"))
        actual = [p for p, _ in _signature(getattr(module, name))]
        assert [p for p, _ in params] == actual, f"docs/optax.md: {row[0]}"


def test_compose_signatures_and_output_fields():
    markdown = (DOCS / "compose.md").read_text()
    _, params = _call(_balanced_call(markdown, "jr.compose").removeprefix("jr."))
    assert params == _signature(jr.compose)
    _, params = _call(_balanced_call(markdown, "out = objective").removeprefix("out = "))
    assert params == _signature(jr.Objective.__call__, skip=("self",))

    rows = _table(markdown, "field |")
    fields = {f.strip("`").split("[")[0] for row in rows for f in row[0].split(", ")}
    attributes = {f.name for f in dataclasses.fields(jr.CompositeOutput)}
    attributes |= {n for n in dir(jr.CompositeOutput) if not n.startswith("_")}
    assert fields <= attributes, fields - attributes
    (term_output,) = [c for row in rows for c in re.findall(r"`(TermOutput\(.*?\))`", row[1])]
    _, params = _call(term_output)
    fields = [f.name.lstrip("_") for f in dataclasses.fields(jr.TermOutput)]
    assert [p for p, _ in params] == fields


def test_remote_service_client_signature():
    text = _balanced_call((DOCS / "remote.md").read_text(), "`ServiceClient")
    _, params = _call(text.lstrip("`").replace("\n", " "))
    assert params == _signature(jr.remote.ServiceClient)


def test_no_document_points_to_removed_files():
    """The architecture and metrics schema live in docs/architecture.md (no DESIGN.md)."""
    root = Path(__file__).parents[1]
    texts = [root / "README.md", *DOCS.glob("*.md"), *(root / "jaxreg").rglob("*.py")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, path
        assert "../shared" not in text, path


def test_docstrings_use_no_sphinx_roles():
    """The API reference is built by mkdocstrings (``make docs``, strict): a Sphinx role
    such as ``:func:`x``` renders as raw text there, and the strict build fails on it.
    Caught here too, so that ``make test`` names the file before the docs build does."""
    role = re.compile(r":(?:func|class|data|mod|meth|attr|obj|exc):`")
    offenders = [
        f"{path}:{number}"
        for path in sorted((DOCS.parent / "jaxreg").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if role.search(line)
    ]
    assert offenders == [], offenders

"""Terms: a named, weighted, pure loss function, and their validation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import axes
from jaxreg._src.core.errors import InputError, TermError

Schedule = Callable[[jax.Array], jax.Array]
"""An optax-style schedule: ``step -> weight`` (``optax.linear_schedule`` etc.)."""

TermFn = Callable[[Any, Any], Any]
"""``fn(x, batch) -> loss`` or ``fn(x, batch) -> (loss, metrics)``."""

TERM_INPUTS = ("outputs", "params")
"""What a term's function reads: the model stage's outputs, or the parameters."""

MAX_TERMS = 100
"""Most terms one objective may hold (the specification's security limit)."""


def _describe(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_weight(name: str, weight: Any) -> float:
    """Checks a concrete weight and returns it as a Python float.

    Raises:
      TermError: unless ``weight`` is a finite, non-negative real number.
    """
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real | np.ndarray | jax.Array):
        raise TermError(
            f"Term {name!r}: weight must be a finite non-negative number or a schedule "
            f"(step -> weight); found {_describe(weight)}."
        )
    if isinstance(weight, np.ndarray | jax.Array):
        if weight.shape != ():
            raise TermError(f"Term {name!r}: weight must be a scalar; found {_describe(weight)}.")
        if isinstance(weight, jax.core.Tracer):
            raise TermError(
                f"Term {name!r}: a Term's own weight must be concrete; pass traced weights "
                "per call instead, as objective(x, batch, weights={...})."
            )
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise TermError(f"Term {name!r}: weight must be finite and non-negative; found {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class Term:
    """A named, weighted loss term: a pure function of the differentiated input.

    The objective built by [`jaxreg.compose`][jaxreg.compose] adds ``weight * fn(x, batch)`` to the
    total loss and reports the term's value, contribution and (optionally) gradient norm.

    Args:
      name: a non-empty name, unique within one objective; it keys the term's metrics.
        It may not contain ``"/"``, the separator of
        [`CompositeOutput.flat`][jaxreg.CompositeOutput.flat].
      fn: a pure, traceable function ``fn(x, batch)`` returning a scalar loss, or a pair
        ``(loss, metrics)`` with ``metrics`` a dict of scalar arrays.
      weight: a finite non-negative number, or an optax-style schedule ``step -> weight``
        evaluated inside the compiled program at the ``step`` passed to the objective.
      on: what ``fn`` reads as its first argument when the objective has a model stage
        (``compose(..., forward=apply_fn)``): ``"outputs"`` (default), the forward's
        output ``apply_fn(params, batch)``; or ``"params"``, the parameters themselves
        (weight decay, L1, L2-SP...). Without a model stage both are ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> l1 = jr.Term("l1", lambda x, batch: jnp.sum(jnp.abs(x)), weight=0.01)
      >>> l1.name, l1.weight
      ('l1', 0.01)
    """

    name: str
    fn: TermFn
    weight: float | Schedule = 1.0
    on: str = dataclasses.field(default="outputs", kw_only=True)

    def __post_init__(self):
        if self.on not in TERM_INPUTS:
            raise TermError(
                f"Term {self.name!r}: on must be one of {list(TERM_INPUTS)}; found {self.on!r}."
            )
        if not isinstance(self.name, str) or not self.name.strip():
            raise TermError(f"Term name must be a non-empty string; found {self.name!r}.")
        if "/" in self.name:
            raise TermError(
                f"Term {self.name!r}: name may not contain '/', the separator of flat() keys."
            )
        if not callable(self.fn):
            raise TermError(
                f"Term {self.name!r}: fn must be callable as fn(x, batch); "
                f"found {_describe(self.fn)}."
            )
        if not callable(self.weight):
            object.__setattr__(self, "weight", check_weight(self.name, self.weight))

    @property
    def differentiable(self) -> bool:
        """Whether the term contributes to the gradient (host terms may not)."""
        return True

    @property
    def scheduled(self) -> bool:
        """Whether the weight is a schedule ``step -> weight``."""
        return callable(self.weight)

    def evaluate(self, x: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Calls ``fn(x, batch)`` and checks that it returned a scalar and scalar metrics.

        An exception raised by ``fn`` keeps its type and gains a note naming the term
        (``InputError`` becomes a [`TermError`][jaxreg.TermError] prefixed with the name).
        """
        try:
            out = self.fn(x, batch)
        except InputError as e:
            raise TermError(f"Term {self.name!r}: {e}") from e
        except Exception as e:
            add_term_note(e, self.name)
            raise
        if out is None:
            raise TermError(
                f"Term {self.name!r}: fn returned None; expected a scalar loss or a pair "
                "(loss, metrics). Did the function forget a return statement?"
            )
        if isinstance(out, tuple):
            if len(out) != 2:
                raise TermError(
                    f"Term {self.name!r}: fn must return a scalar loss or a pair "
                    f"(loss, metrics); found a tuple of length {len(out)}."
                )
            loss, metrics = out
        else:
            loss, metrics = out, {}
        loss = _check_scalar(self.name, "loss", loss)
        if metrics is None:
            metrics = {}
        if not isinstance(metrics, Mapping):
            raise TermError(
                f"Term {self.name!r}: metrics must be a dict of scalar arrays; "
                f"found {_describe(metrics)}."
            )
        checked = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise TermError(
                    f"Term {self.name!r}: metric names must be non-empty strings without '/'; "
                    f"found {key!r}."
                )
            checked[key] = _check_scalar(self.name, f"metrics[{key!r}]", value)
        if axes.current():
            loss = _global(self.name, "loss", loss)
            checked = {k: _global(self.name, f"metrics[{k!r}]", v) for k, v in checked.items()}
        return loss, checked


def _global(name: str, field: str, value: jax.Array) -> jax.Array:
    """``value`` made global inside ``compose(..., axis_name=...)``: psum-ed if it varies.

    A value that still varies across the named axes is this shard's share of a sum (a
    ``jnp.sum`` over the shard's tokens); one that varies across another manual axis of
    the ``shard_map`` cannot be made global here and is refused.
    """
    value = axes.psum(value)
    other = axes.varying(value) - set(axes.current())
    if other:
        raise TermError(
            f"Term {name!r}: {field} varies across the shard_map axes {sorted(other)}, which "
            f"are not in compose(..., axis_name={axes.current()!r}); add them to axis_name "
            "(or reduce the value over them inside the term)."
        )
    return value


def add_term_note(error: BaseException, name: str, kind: str = "Term") -> None:
    """Notes on ``error`` (``add_note``) that it came from the term ``name``, once."""
    note = f"raised by jaxreg {kind} {name!r}"
    if note not in getattr(error, "__notes__", ()):
        error.add_note(note)


def _check_scalar(name: str, field: str, value: Any) -> jax.Array:
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TermError(
            f"Term {name!r}: {field} must be a scalar array; found {_describe(value)}."
        ) from None
    if array.shape != ():
        raise TermError(
            f"Term {name!r}: {field} must be a scalar (shape ()); found {_describe(array)}. "
            "Reduce it (e.g. jnp.sum or jnp.mean) inside the term."
        )
    if field == "loss" and not jnp.issubdtype(array.dtype, jnp.floating):
        raise TermError(
            f"Term {name!r}: loss must have a floating dtype to be differentiated; "
            f"found {array.dtype}."
        )
    return array


def as_term(spec: Any, *, role: str, default_name: str) -> Term:
    """Normalises a [`Term`][jaxreg.Term], an SDK-style dict, or a plain callable to a Term."""
    if isinstance(spec, Term):
        return spec
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "fn", "weight", "on"}
        if unknown:
            raise TermError(
                f"{role} {spec.get('name', '?')!r}: unknown keys {sorted(unknown)}; "
                "expected 'name', 'fn' and optionally 'weight' and 'on'."
            )
        missing = {"name", "fn"} - set(spec)
        if missing:
            raise TermError(
                f"{role} {spec.get('name', '?')!r}: missing keys {sorted(missing)}; "
                "expected {'name': str, 'fn': callable, 'weight': float}."
            )
        return Term(spec["name"], spec["fn"], spec.get("weight", 1.0), on=spec.get("on", "outputs"))
    if callable(spec):
        return Term(default_name, spec)
    raise TermError(
        f"{role}: expected a jaxreg.Term, a dict {{'name', 'fn', 'weight'}} or a callable "
        f"fn(x, batch); found {_describe(spec)}."
    )


def normalize_terms(base: Any, regularizers: Any) -> tuple[Term | None, tuple[Term, ...]]:
    """Validates the base and regularizers given to ``compose`` and returns Terms."""
    base_term = None if base is None else as_term(base, role="base", default_name="base")
    if regularizers is None:
        regularizers = ()
    if isinstance(regularizers, Term | Mapping) or callable(regularizers):
        regularizers = (regularizers,)
    if not isinstance(regularizers, Sequence):
        raise TermError(
            "regularizers must be a sequence of jaxreg.Term (or dicts); "
            f"found {_describe(regularizers)}."
        )
    regs = tuple(
        as_term(r, role=f"regularizers[{i}]", default_name=f"regularizer_{i}")
        for i, r in enumerate(regularizers)
    )
    if base_term is None and not regs:
        raise TermError("compose needs a base loss or at least one regularizer; got neither.")
    if len(regs) > MAX_TERMS:
        raise TermError(f"compose accepts at most {MAX_TERMS} regularizers; found {len(regs)}.")
    seen: set[str] = set()
    for term in ((base_term,) if base_term else ()) + regs:
        if term.name in seen:
            raise TermError(
                f"Term {term.name!r}: names must be unique within an objective; "
                "it appears more than once."
            )
        seen.add(term.name)
    return base_term, regs

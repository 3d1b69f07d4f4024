"""The objective's output: registered pytrees, the metrics schema and flat logger dicts.

All scalar results of one call travel out of the compiled program packed in one vector
(``CompositeOutput.scalars``), so that a call returns a handful of arrays instead of one
per metric; the documented fields are views into it, built on access.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import gather
from jaxreg._src.core.errors import InputError, NotComputedError

__all__ = ["CompositeOutput", "Layout", "TermOutput", "format_table", "pack"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class TermOutput:
    """One term's measurements for one call of the objective.

    Attributes:
      value: the term's unweighted loss value.
      weight: the weight used on this call (after schedules and per-call overrides).
      contribution: ``weight * value``, the term's share of ``loss_total``.
      custom: the metrics the term's function returned, a dict of scalar arrays.
      name: the term's name.
      differentiable: whether the term contributes to ``grad`` (host terms without a
        gradient do not).

    ``grad_norm`` and ``grad_norm_weighted`` are properties: reading them from an
    objective composed without ``track_grad_norms=True`` raises
    [`NotComputedError`][jaxreg.NotComputedError] naming that flag.
    """

    value: jax.Array
    weight: jax.Array
    contribution: jax.Array
    custom: dict[str, jax.Array]
    _grad_norm: jax.Array | None = None
    _grad_norm_weighted: jax.Array | None = None
    name: str = dataclasses.field(default="", metadata={"static": True})
    differentiable: bool = dataclasses.field(default=True, metadata={"static": True})

    @property
    def grad_norm(self) -> jax.Array:
        """The L2 norm (global over the pytree) of the term's own, unweighted gradient."""
        if self._grad_norm is None:
            raise NotComputedError(
                f"term {self.name!r}: grad_norm was not computed; compose the objective "
                "with track_grad_norms=True."
            )
        return self._grad_norm

    @property
    def grad_norm_weighted(self) -> jax.Array:
        """``weight * grad_norm``, the norm of the term's contribution to ``grad``."""
        if self._grad_norm_weighted is None:
            raise NotComputedError(
                f"term {self.name!r}: grad_norm_weighted was not computed; compose the "
                "objective with track_grad_norms=True."
            )
        return self._grad_norm_weighted

    @property
    def has_grad_norm(self) -> bool:
        """Whether ``grad_norm`` was computed (``track_grad_norms=True``)."""
        return self._grad_norm is not None

    def __repr__(self) -> str:
        fields = ["value", "weight", "contribution"] + (["grad_norm"] if self.has_grad_norm else [])
        parts = [f"{f}={_short(getattr(self, f))}" for f in fields]
        parts += [f"{k}={_short(v)}" for k, v in self.custom.items()]
        return f"TermOutput({self.name!r}, {', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each scalar lives in the packed vector (static: part of the pytree's treedef)."""

    names: tuple[str, ...]
    has_base: bool
    custom: tuple[tuple[str, ...], ...]
    norms: bool
    differentiable: tuple[bool, ...]
    grad_space: str = "x"

    @property
    def fields(self) -> int:
        """Per-term fields: value, weight, contribution[, grad_norm, grad_norm_weighted]."""
        return 5 if self.norms else 3

    @functools.cached_property
    def custom_offsets(self) -> tuple[int, ...]:
        """Where each term's custom metrics start (after the ``[fields, n]`` block)."""
        at = 3 + self.fields * len(self.names)
        offsets = []
        for keys in self.custom:
            offsets.append(at)
            at += len(keys)
        return (*offsets, at)

    @property
    def size(self) -> int:
        return self.custom_offsets[-1]


# Fixed slots of the packed vector; then a ``[fields, n]`` block (field-major), then the
# custom metrics of each term in order.
LOSS_TOTAL, REGULARIZER_TOTAL, TOTAL_GRAD_NORM = 0, 1, 2


def pack(
    *,
    names: tuple[str, ...],
    has_base: bool,
    values: Any,
    weights: Any,
    contributions: Any,
    custom: Sequence[Mapping[str, Any]],
    differentiable: tuple[bool, ...],
    grad: Any,
    norms: Any = None,
    total_norm: Any = None,
    grad_cosines: Any = None,
    term_grads: Any = None,
    grad_space: str = "x",
    errors: tuple[tuple[str, str], ...] = (),
    aux: Any = None,
    xp: Any = jnp,
) -> CompositeOutput:
    """Packs one call's results into a ``CompositeOutput``: the one owner of the layout.

    Both the compiled program (``xp=jax.numpy``, traced arrays) and the host-term path
    (``xp=numpy``, concrete float64) build their output here, so the packed vector
    ``[loss_total, regularizer_total, total_grad_norm, fields..., custom...]`` and its
    ``Layout`` are defined once.

    Args:
      names: the term names, the base first when ``has_base``.
      values, weights, contributions: ``[n]`` arrays in term order.
      custom: each term's custom metrics (dicts of scalars), in term order.
      norms: ``[n]`` per-term gradient norms, or ``None`` when not tracked.
      total_norm: ``||grad||``, given with ``norms``.
    """
    track = norms is not None
    dtype = values.dtype
    start = 1 if has_base else 0
    totals = [
        xp.sum(contributions),
        xp.sum(contributions[start:]),
        total_norm if track else xp.zeros((), dtype),
    ]
    fields = [values, weights, contributions] + ([norms, weights * norms] if track else [])
    flat_custom = [xp.asarray(v).astype(dtype) for m in custom for v in m.values()]
    parts = [xp.stack([xp.asarray(t).astype(dtype) for t in totals]), *fields]
    if flat_custom:
        parts.append(xp.stack(flat_custom))
    layout = Layout(
        names=tuple(names),
        has_base=has_base,
        custom=tuple(tuple(m) for m in custom),
        norms=track,
        differentiable=tuple(differentiable),
        grad_space=grad_space,
    )
    return CompositeOutput(
        grad=grad,
        scalars=xp.concatenate(parts),
        _grad_cosines=grad_cosines,
        _term_grads=term_grads,
        _aux=aux,
        layout=layout,
        errors=errors,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class CompositeOutput:
    """Everything one call of a composed objective computes, as a pytree of arrays.

    It is a pytree: return it from ``jax.jit``, carry it through ``lax.scan``, or map it
    with ``jax.tree.map``. Read it through its properties:

    * ``grad``, [`loss_total`][jaxreg.CompositeOutput.loss_total],
      [`regularizer_total`][jaxreg.CompositeOutput.regularizer_total];
    * [`terms`][jaxreg.CompositeOutput.terms] (``{name: TermOutput}``, the base first),
      [`base_loss`][jaxreg.CompositeOutput.base_loss] and
      [`regularizers`][jaxreg.CompositeOutput.regularizers], each a
      [`TermOutput`][jaxreg.TermOutput] with ``value``, ``weight``, ``contribution``, ``custom``
      and, when tracked, ``grad_norm``;
    * [`total_grad_norm`][jaxreg.CompositeOutput.total_grad_norm],
      [`grad_cosines`][jaxreg.CompositeOutput.grad_cosines],
      [`term_grads`][jaxreg.CompositeOutput.term_grads] and
      [`aux`][jaxreg.CompositeOutput.aux] when the flag that computes them was set
      (otherwise reading them raises [`NotComputedError`][jaxreg.NotComputedError] naming the flag);
    * [`as_arrays`][jaxreg.CompositeOutput.as_arrays] (the metrics schema as a dict of arrays, under
      ``jit`` too), [`to_dict`][jaxreg.CompositeOutput.to_dict] and
      [`flat`][jaxreg.CompositeOutput.flat] (plain floats, for loggers).

    ``print(out)`` shows a table of the terms.

    Attributes:
      grad: the gradient of ``loss_total`` with respect to ``x`` (same pytree as ``x``).
      scalars: every scalar result, packed in one vector (its last axis; leading axes
        appear under ``jax.vmap``); read it through the properties.
      layout: where each scalar lives in ``scalars`` (static).
      errors: ``(name, message)`` of the host terms that failed and were skipped
        (``on_error="skip"``); they are left out of the loss and listed by ``to_dict``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> mse = jr.Term("mse", lambda x, b: jnp.mean((x - 1.0) ** 2))
      >>> l1 = jr.Term("l1", lambda x, b: jnp.sum(jnp.abs(x)), weight=0.1)
      >>> out = jr.compose(mse, [l1], track_grad_norms=True)(jnp.array([0.0, 2.0]))
      >>> round(float(out.regularizers["l1"].contribution), 6)   # 0.1 * |0| + 0.1 * |2|
      0.2
      >>> out.to_dict()["base_loss"]["value"]
      1.0
    """

    grad: Any
    scalars: jax.Array
    _grad_cosines: jax.Array | None = None
    _term_grads: Any = None
    _aux: Any = None
    layout: Layout = dataclasses.field(default=None, metadata={"static": True})  # type: ignore[assignment]
    errors: tuple[tuple[str, str], ...] = dataclasses.field(default=(), metadata={"static": True})

    @property
    def term_names(self) -> tuple[str, ...]:
        """The names of all terms, the base first."""
        return self.layout.names

    @property
    def grad_space(self) -> str:
        """The space of ``grad``, norms, cosines and ``term_grads``: ``"x"`` or ``"logits"``.

        ``"x"``: gradients with respect to the differentiated input itself (model
        parameters, or logprobs). ``"logits"``: ``x`` was declared full-distribution
        logprobs (``compose(..., grad_space="logits")``) and every gradient was mapped to
        the logits, the part that moves the model.
        """
        return self.layout.grad_space

    @property
    def loss_total(self) -> jax.Array:
        """``base + sum_i weight_i * value_i``."""
        return self._get(LOSS_TOTAL)

    @property
    def regularizer_total(self) -> jax.Array:
        """``sum_i weight_i * value_i`` over the regularizers."""
        return self._get(REGULARIZER_TOTAL)

    @property
    def total_grad_norm(self) -> jax.Array:
        """``||grad||_2``; needs ``track_grad_norms=True``."""
        if not self.layout.norms:
            raise NotComputedError(
                "total_grad_norm was not computed; compose the objective with "
                "track_grad_norms=True."
            )
        return self._get(TOTAL_GRAD_NORM)

    @property
    def grad_cosines(self) -> jax.Array:
        """``[n, n]`` cosines between the terms' gradients (order: ``term_names``).

        Needs ``grad_conflicts=True``.
        """
        if self._grad_cosines is None:
            raise NotComputedError(
                "grad_cosines was not computed; compose the objective with grad_conflicts=True."
            )
        return self._grad_cosines

    @property
    def term_grads(self) -> Any:
        """Each term's own unweighted gradient, stacked on a leading axis of size ``n``.

        Same pytree as ``x`` with a leading term axis (order:
        [`term_names`][jaxreg.CompositeOutput.term_names]): what the aggregators of
        [`jaxreg.aggregators`][jaxreg.aggregators] take. Needs ``term_grads=True``.
        """
        if self._term_grads is None:
            raise NotComputedError(
                "term_grads was not computed; compose the objective with term_grads=True "
                "(the aggregators of jaxreg.aggregators read out.term_grads)."
            )
        return self._term_grads

    @property
    def aux(self) -> Any:
        """What the model stage returned beside its outputs (``forward_has_aux=True``).

        For example a model's updated BatchNorm statistics: ``forward(params, batch)``
        returns ``(outputs, aux)``; ``aux`` is not differentiated.
        """
        if self._aux is None:
            raise NotComputedError(
                "aux was not computed; compose the objective with forward=apply_fn and "
                "forward_has_aux=True, apply_fn returning (outputs, aux)."
            )
        return self._aux

    @property
    def has_grad_norms(self) -> bool:
        """Whether grad norms were computed (``track_grad_norms=True``)."""
        return self.layout.norms

    @property
    def has_grad_cosines(self) -> bool:
        """Whether ``grad_cosines`` was computed (``grad_conflicts=True``)."""
        return self._grad_cosines is not None

    @property
    def has_term_grads(self) -> bool:
        """Whether ``term_grads`` was computed (``term_grads=True``)."""
        return self._term_grads is not None

    def _get(self, k: int) -> jax.Array:
        _check_size(self.layout, np.shape(self.scalars))
        return self.scalars[..., k]

    def _term(self, i: int, get: Any = None) -> TermOutput:
        """Term ``i``'s output, reading slot ``k`` of the packed vector as ``get(k)``."""
        get = get or self._get
        layout = self.layout
        n = len(layout.names)

        def field(f: int) -> Any:
            return get(3 + f * n + i)

        at = layout.custom_offsets[i]
        return TermOutput(
            value=field(0),
            weight=field(1),
            contribution=field(2),
            custom={key: get(at + j) for j, key in enumerate(layout.custom[i])},
            _grad_norm=field(3) if layout.norms else None,
            _grad_norm_weighted=field(4) if layout.norms else None,
            name=layout.names[i],
            differentiable=layout.differentiable[i],
        )

    @property
    def base_loss(self) -> TermOutput:
        """The base term's [`TermOutput`][jaxreg.TermOutput]; needs a base loss in ``compose``."""
        if not self.layout.has_base:
            raise NotComputedError(
                "this objective has no base loss (compose(None, ...)); read its terms "
                "from out.regularizers."
            )
        return self._term(0)

    @property
    def regularizers(self) -> dict[str, TermOutput]:
        """``{name: TermOutput}`` in the order the regularizers were given."""
        start = 1 if self.layout.has_base else 0
        return {self.layout.names[i]: self._term(i) for i in range(start, len(self.layout.names))}

    @property
    def terms(self) -> dict[str, TermOutput]:
        """``{name: TermOutput}`` for every term, the base first, in the order given."""
        return {n: self._term(i) for i, n in enumerate(self.layout.names)}

    def as_arrays(self) -> dict[str, Any]:
        """The metrics schema as a dict of arrays: the structure of ``to_dict``.

        Unlike [`to_dict`][jaxreg.CompositeOutput.to_dict], nothing leaves the device, so it works
        inside ``jax.jit``, ``jax.vmap`` and ``lax.scan`` (the leaves carry the leading axes of
        a vmapped or scanned output). Strings (``grad_space``, host ``errors``) are left
        out: they are static, read them from ``out.grad_space`` and ``out.errors``.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> import jaxreg as jr
          >>> objective = jr.compose(jr.Term("sq", lambda x, b: jnp.sum(x**2)))
          >>> def step(x, _):
          ...     out = objective(x)
          ...     return x - 0.25 * out.grad, out.as_arrays()
          >>> _, history = jax.lax.scan(step, jnp.ones(2), length=3)
          >>> history["base_loss"]["value"].tolist()
          [2.0, 0.5, 0.125]
        """
        return _schema(self.layout, self._get, self._grad_cosines, strings=False)

    def to_dict(self) -> dict[str, Any]:
        """The metrics schema (docs/architecture.md) as plain Python floats (one transfer).

        ``{"loss_total", "regularizer_total", "base_loss": {"value", "weight",
        "contribution", "custom", ["grad_norm", "grad_norm_weighted"]},
        "regularizers": {name: {same keys}}, ["total_grad_norm"], ["grad_cosines":
        {name: {name: cosine}}], ["grad_space": "x" | "logits"], ["errors"]}``; bracketed
        keys appear only when computed (``grad_space`` with the norms or cosines it
        qualifies), ``base_loss`` only with a base.
        """
        if self._grad_cosines is None:
            scalars, cosines = _host(self.scalars, self.layout), None
        else:
            if gather.fully_addressable((self.scalars, self._grad_cosines)):
                scalars, cosines = jax.device_get((self.scalars, self._grad_cosines))
            else:  # replicated global arrays: read from local copies
                scalars, cosines = self.scalars, gather.to_host(self._grad_cosines)
            scalars = _host(scalars, self.layout)
        result = _schema(self.layout, scalars.__getitem__, cosines, strings=True, to=_float)
        if self.errors:
            result["errors"] = dict(self.errors)
        return result

    def flat(self, prefix: str = "") -> dict[str, Any]:
        """A flat ``{"regularizers/kl/grad_norm": float, ...}`` dict for experiment loggers.

        Args:
          prefix: prepended to every key (e.g. ``"train/"``).
        """
        flat: dict[str, Any] = {}
        d = self.to_dict()
        d.pop("grad_space", None)  # numbers only; the space is ``out.grad_space``
        _flatten(d, prefix, flat)
        return flat

    def __repr__(self) -> str:
        names = list(self.layout.names)
        scalars = self.scalars
        if isinstance(scalars, jax.core.Tracer) or np.ndim(scalars) != 1:
            shape = getattr(scalars, "shape", ())
            return f"CompositeOutput(terms={names}, scalars={type(scalars).__name__}{shape})"
        return format_table(self)

    __str__ = __repr__


def format_table(out: CompositeOutput) -> str:
    """``print(out)``: the totals, then one labelled row per term."""
    d = out.to_dict()
    head = [
        f"loss_total={_short(d['loss_total'])}",
        f"regularizer_total={_short(d['regularizer_total'])}",
    ]
    if "total_grad_norm" in d:
        head.append(f"total_grad_norm={_short(d['total_grad_norm'])}")
    if "grad_space" in d:
        head.append(f"grad_space={d['grad_space']!r}")
    columns = ["term", "value", "weight", "contribution"]
    if out.layout.norms:
        columns += ["grad_norm", "grad_norm_weighted"]
    columns.append("metrics")
    rows = []
    entries = ([("base_loss", d["base_loss"])] if "base_loss" in d else []) + list(
        d["regularizers"].items()
    )
    for i, (_, e) in enumerate(entries):
        name = out.layout.names[i] + (" (base)" if "base_loss" in d and i == 0 else "")
        cells = [name] + [_short(e[c]) for c in columns[1:-1]]
        cells.append(", ".join(f"{k}={_short(v)}" for k, v in e["custom"].items()))
        rows.append(cells)
    widths = [max(len(r[j]) for r in [columns, *rows]) for j in range(len(columns))]
    lines = [f"CompositeOutput({', '.join(head)})"]
    for r in [columns, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if d.get("errors"):
        lines.append(f"  skipped host terms: {d['errors']}")
    return "\n".join(lines)


def _schema(
    layout: Layout, get: Any, cosines: Any, *, strings: bool, to: Any = None
) -> dict[str, Any]:
    """The metrics schema, reading packed slot ``k`` as ``get(k)`` (converted by ``to``)."""
    to = to or (lambda v: v)
    n = len(layout.names)
    result: dict[str, Any] = {
        "loss_total": to(get(LOSS_TOTAL)),
        "regularizer_total": to(get(REGULARIZER_TOTAL)),
        "regularizers": {},
    }
    for i, name in enumerate(layout.names):
        field = lambda f, i=i: to(get(3 + f * n + i))
        entry: dict[str, Any] = {"value": field(0), "weight": field(1), "contribution": field(2)}
        at = layout.custom_offsets[i]
        entry["custom"] = {key: to(get(at + j)) for j, key in enumerate(layout.custom[i])}
        if layout.norms:
            entry["grad_norm"] = field(3)
            entry["grad_norm_weighted"] = field(4)
        if strings and not layout.differentiable[i]:
            entry["differentiable"] = False
        if layout.has_base and i == 0:
            result["base_loss"] = entry
        else:
            result["regularizers"][name] = entry
    if layout.norms:
        result["total_grad_norm"] = to(get(TOTAL_GRAD_NORM))
    if strings and (layout.norms or cosines is not None):
        result["grad_space"] = layout.grad_space
    if cosines is not None:
        if strings:
            result["grad_cosines"] = {
                a: {b: _float(cosines[i, j]) for j, b in enumerate(layout.names)}
                for i, a in enumerate(layout.names)
            }
        else:
            result["grad_cosines"] = cosines
    return result


def _short(value: Any) -> str:
    """A number in a few significant digits, for tables."""
    if isinstance(value, jax.core.Tracer):
        return "<traced>"
    array = np.asarray(value)
    if array.ndim:
        return f"array{array.shape}"
    return f"{float(array):.6g}"


def _float(value: Any) -> float:
    if isinstance(value, float):
        return value
    value = np.asarray(value)
    if value.dtype.itemsize < 8:
        # The shortest decimal that round-trips in the value's own precision, so that a
        # float32 weight of 0.1 reports as 0.1, not 0.10000000149011612.
        return float(str(value.astype(np.float32)))
    return float(value)


def _check_size(layout: Layout, shape: tuple[int, ...]) -> None:
    """Refuses packed scalars whose length is not the layout's (e.g. concatenated shards)."""
    if shape and shape[-1] != layout.size:
        shards = f" ({shape[-1] // layout.size} copies)" if shape[-1] % layout.size == 0 else ""
        raise InputError(
            f"the packed scalars have {shape[-1]} entries where the layout of terms "
            f"{list(layout.names)} has {layout.size}{shards}: the output was concatenated "
            "across shards (a shard_map with out_specs=P('data') for the whole output?). "
            "Return the output replicated (out_specs=P() for its scalars, from "
            "compose(..., axis_name=...) so that they are global) and shard only grad; "
            "see docs/distributed.md."
        )


def _host(scalars: Any, layout: Layout) -> list[float]:
    """The packed scalars as Python floats."""
    _check_size(layout, np.shape(scalars))
    if isinstance(scalars, jax.Array) and not scalars.is_fully_addressable:
        if not scalars.is_fully_replicated:
            raise InputError(
                "to_dict(): the packed scalars are sharded across processes; they must be "
                "replicated (return them with out_specs=P() from shard_map, or leave them "
                "to jit's default, replicated); see docs/distributed.md."
            )
        scalars = scalars.addressable_data(0)
    array = np.asarray(jax.device_get(scalars))
    if array.ndim != 1:
        raise InputError(
            f"to_dict() needs the output of one call; found scalars of shape {array.shape} "
            "(a vmapped output? index it first, e.g. jax.tree.map(lambda a: a[0], out), "
            "or use out.as_arrays())."
        )
    if array.dtype.itemsize < 8:
        return [float(str(v)) for v in array.astype(np.float32)]
    return array.tolist()


def _flatten(tree: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}/", out)
        else:
            out[f"{prefix}{key}"] = value

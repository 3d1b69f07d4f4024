"""The objective's output: registered pytrees, the metrics schema and flat logger dicts.

All scalar results of one call travel out of the compiled program packed in one vector
(``CompositeOutput.scalars``), so that a call returns a handful of arrays instead of one
per metric; the documented fields are views into it, built on access.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TermOutput:
    """One term's measurements for one call of the objective.

    Attributes:
      value: the term's unweighted loss value.
      weight: the weight used on this call (after schedules and per-call overrides).
      contribution: ``weight * value``, the term's share of ``loss_total``.
      custom: the metrics the term's function returned, a dict of scalar arrays.
      grad_norm: the L2 norm (global over the pytree) of the term's own, unweighted
        gradient; ``None`` unless ``track_grad_norms`` was set.
      grad_norm_weighted: ``weight * grad_norm``; ``None`` unless tracked.
      name: the term's name.
      differentiable: whether the term contributes to ``grad`` (host terms without a
        gradient do not).
    """

    value: jax.Array
    weight: jax.Array
    contribution: jax.Array
    custom: dict[str, jax.Array]
    grad_norm: jax.Array | None = None
    grad_norm_weighted: jax.Array | None = None
    name: str = dataclasses.field(default="", metadata={"static": True})
    differentiable: bool = dataclasses.field(default=True, metadata={"static": True})


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompositeOutput:
    """Everything one call of a composed objective computes, as a pytree of arrays.

    Attributes:
      grad: the gradient of ``loss_total`` with respect to ``x`` (same pytree as ``x``).
      scalars: every scalar result, packed in one vector (its last axis; leading axes
        appear under ``jax.vmap``); read it through the properties below.
      grad_cosines: ``[n, n]`` cosine similarities between the terms' gradients (order:
        [`term_names`][jaxreg.CompositeOutput.term_names]) when ``grad_conflicts`` was set, else
        ``None``.
      term_grads: each term's own unweighted gradient, stacked on a leading axis of
        size ``n`` (order: [`term_names`][jaxreg.CompositeOutput.term_names]), when ``term_grads``
        was set, else ``None``.
      layout: where each scalar lives in ``scalars`` (static).
      errors: ``(name, message)`` of the host terms that failed and were skipped
        (``on_error="skip"``); they are left out of the loss and listed by ``to_dict``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> objective = jr.compose(
      ...     jr.Term("fit", lambda x, batch: jnp.sum((x - 1.0) ** 2)),
      ...     [jr.Term("l1", lambda x, batch: jnp.sum(jnp.abs(x)), weight=0.5)],
      ...     track_grad_norms=True,
      ... )
      >>> out = objective(jnp.array([3.0, -1.0]))
      >>> float(out.loss_total), out.grad.tolist()        # 8 + 0.5 * 4; 2 (x - 1) + 0.5 sign(x)
      (10.0, [4.5, -4.5])
      >>> float(out.regularizers["l1"].contribution)
      2.0
      >>> out.to_dict()["regularizers"]["l1"]["grad_norm"]   # |sign(x)| = sqrt(2)
      1.4142135
      >>> out.flat()["base_loss/value"]
      8.0
    """

    grad: Any
    scalars: jax.Array
    grad_cosines: jax.Array | None = None
    term_grads: Any = None
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
        return self.scalars[..., LOSS_TOTAL]

    @property
    def regularizer_total(self) -> jax.Array:
        """``sum_i weight_i * value_i`` over the regularizers."""
        return self.scalars[..., REGULARIZER_TOTAL]

    @property
    def total_grad_norm(self) -> jax.Array | None:
        """``||grad||_2`` when ``track_grad_norms`` was set, else ``None``."""
        return self.scalars[..., TOTAL_GRAD_NORM] if self.layout.norms else None

    def _get(self, k: int) -> jax.Array:
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
            grad_norm=field(3) if layout.norms else None,
            grad_norm_weighted=field(4) if layout.norms else None,
            name=layout.names[i],
            differentiable=layout.differentiable[i],
        )

    @property
    def base_loss(self) -> TermOutput | None:
        """The base term's [`TermOutput`][jaxreg.TermOutput], or ``None`` without a base."""
        return self._term(0) if self.layout.has_base else None

    @property
    def regularizers(self) -> dict[str, TermOutput]:
        """``{name: TermOutput}`` in the order the regularizers were given."""
        start = 1 if self.layout.has_base else 0
        return {self.layout.names[i]: self._term(i) for i in range(start, len(self.layout.names))}

    @property
    def terms(self) -> dict[str, TermOutput]:
        """All terms' outputs, the base first, keyed by name."""
        return {n: self._term(i) for i, n in enumerate(self.layout.names)}

    def to_dict(self) -> dict[str, Any]:
        """The metrics schema (docs/architecture.md) as plain Python floats (one transfer).

        ``{"loss_total", "regularizer_total", "regularizers": {name: {"value", "weight",
        "contribution", "custom", ["grad_norm", "grad_norm_weighted"]}}, ["base_loss":
        {"value", "custom", ["grad_norm"]}], ["total_grad_norm"], ["grad_cosines":
        {name: {name: cosine}}], ["grad_space": "x" | "logits"]}``; bracketed keys appear
        only when computed (``grad_space`` with the norms or cosines it qualifies).
        """
        if self.grad_cosines is None:
            scalars, cosines = _host(self.scalars), None
        else:
            scalars, cosines = jax.device_get((self.scalars, self.grad_cosines))
            scalars = _host(scalars)
        layout = self.layout
        result: dict[str, Any] = {
            "loss_total": scalars[LOSS_TOTAL],
            "regularizer_total": scalars[REGULARIZER_TOTAL],
            "regularizers": {},
        }
        for i, name in enumerate(layout.names):
            term = self._term(i, scalars.__getitem__)
            base = layout.has_base and i == 0
            entry: dict[str, Any] = {"value": term.value}
            if not base:
                entry["weight"] = term.weight
                entry["contribution"] = term.contribution
            entry["custom"] = term.custom
            if layout.norms:
                entry["grad_norm"] = term.grad_norm
                if not base:
                    entry["grad_norm_weighted"] = term.grad_norm_weighted
            if not term.differentiable:
                entry["differentiable"] = False
            if base:
                result["base_loss"] = entry
            else:
                result["regularizers"][name] = entry
        if layout.norms:
            result["total_grad_norm"] = scalars[TOTAL_GRAD_NORM]
        if layout.norms or cosines is not None:
            result["grad_space"] = layout.grad_space
        if self.errors:
            result["errors"] = dict(self.errors)
        if cosines is not None:
            result["grad_cosines"] = {
                a: {b: _float(cosines[i, j]) for j, b in enumerate(layout.names)}
                for i, a in enumerate(layout.names)
            }
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


def _float(value: Any) -> float:
    value = np.asarray(value)
    if value.dtype.itemsize < 8:
        # The shortest decimal that round-trips in the value's own precision, so that a
        # float32 weight of 0.1 reports as 0.1, not 0.10000000149011612.
        return float(str(value.astype(np.float32)))
    return float(value)


def _host(scalars: Any) -> list[float]:
    """The packed scalars as Python floats."""
    array = np.asarray(jax.device_get(scalars))
    if array.ndim != 1:
        raise ValueError(
            f"to_dict() needs the output of one call; found scalars of shape {array.shape} "
            "(a vmapped output? index it first, e.g. jax.tree.map(lambda a: a[0], out))."
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

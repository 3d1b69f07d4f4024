"""The objective's output: registered pytrees, the metrics schema and flat logger dicts."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TermOutput:
    """One term's measurements for one call of the objective.

    Attributes:
      name: the term's name.
      value: the term's unweighted loss value.
      weight: the weight used on this call (after schedules and per-call overrides).
      contribution: ``weight * value``, the term's share of ``loss_total``.
      custom: the metrics the term's function returned, a dict of scalar arrays.
      grad_norm: the L2 norm (global over the pytree) of the term's own, unweighted
        gradient; ``None`` unless ``track_grad_norms`` was set.
      grad_norm_weighted: ``weight * grad_norm``; ``None`` unless tracked.
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

    def metrics(self, *, base: bool = False) -> dict[str, Any]:
        """This term's entry in the metrics schema, as (unconverted) arrays."""
        entry: dict[str, Any] = {"value": self.value}
        if not base:
            entry["weight"] = self.weight
            entry["contribution"] = self.contribution
        entry["custom"] = dict(self.custom)
        if self.grad_norm is not None:
            entry["grad_norm"] = self.grad_norm
            if not base:
                entry["grad_norm_weighted"] = self.grad_norm_weighted
        if not self.differentiable:
            entry["differentiable"] = False
        return entry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompositeOutput:
    """Everything one call of a composed objective computes, as a pytree of arrays.

    Attributes:
      loss_total: ``base + sum_i weight_i * value_i``.
      grad: the gradient of ``loss_total`` with respect to ``x`` (same pytree as ``x``).
      regularizer_total: ``sum_i weight_i * value_i`` over the regularizers.
      base_loss: the base term's :class:`TermOutput`, or ``None`` without a base.
      regularizers: ``{name: TermOutput}`` in the order the regularizers were given.
      total_grad_norm: ``||grad||_2`` when ``track_grad_norms`` was set, else ``None``.
      grad_cosines: ``[n, n]`` cosine similarities between the terms' gradients (order:
        :attr:`term_names`) when ``grad_conflicts`` was set, else ``None``.
      term_grads: each term's own unweighted gradient, stacked on a leading axis of
        size ``n`` (order: :attr:`term_names`), when ``term_grads`` was set, else ``None``.
      term_names: the names of all terms, the base first.

    Example:
      >>> out = objective(x, batch)              # doctest: +SKIP
      >>> out.regularizers["kl"].contribution    # doctest: +SKIP
      >>> out.to_dict()["loss_total"]            # doctest: +SKIP
    """

    loss_total: jax.Array
    grad: Any
    regularizer_total: jax.Array
    base_loss: TermOutput | None
    regularizers: dict[str, TermOutput]
    total_grad_norm: jax.Array | None = None
    grad_cosines: jax.Array | None = None
    term_grads: Any = None
    term_names: tuple[str, ...] = dataclasses.field(default=(), metadata={"static": True})

    @property
    def terms(self) -> dict[str, TermOutput]:
        """All terms' outputs, the base first, keyed by name."""
        terms = {} if self.base_loss is None else {self.base_loss.name: self.base_loss}
        terms.update(self.regularizers)
        return terms

    def metrics_tree(self) -> dict[str, Any]:
        """The metrics schema as a nested dict of (unconverted) arrays."""
        tree: dict[str, Any] = {
            "loss_total": self.loss_total,
            "regularizer_total": self.regularizer_total,
            "regularizers": {n: t.metrics() for n, t in self.regularizers.items()},
        }
        if self.base_loss is not None:
            tree["base_loss"] = self.base_loss.metrics(base=True)
        if self.total_grad_norm is not None:
            tree["total_grad_norm"] = self.total_grad_norm
        if self.grad_cosines is not None:
            tree["grad_cosines"] = self.grad_cosines
        return tree

    def to_dict(self) -> dict[str, Any]:
        """The metrics schema of DESIGN.md with plain Python floats (one device transfer).

        ``grad_cosines``, when present, becomes ``{name: {name: cosine}}``.
        """
        host = jax.device_get(self.metrics_tree())
        cosines = host.pop("grad_cosines", None)
        result = _to_python(host)
        if cosines is not None:
            names = self.term_names
            result["grad_cosines"] = {
                a: {b: float(cosines[i, j]) for j, b in enumerate(names)}
                for i, a in enumerate(names)
            }
        return result

    def flat(self, prefix: str = "") -> dict[str, float]:
        """A flat ``{"regularizers/kl/grad_norm": float, ...}`` dict for experiment loggers.

        Args:
          prefix: prepended to every key (e.g. ``"train/"``).
        """
        flat: dict[str, float] = {}
        _flatten(self.to_dict(), prefix, flat)
        return flat


def _to_python(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_python(v) for k, v in tree.items()}
    if isinstance(tree, bool):
        return tree
    value = np.asarray(tree)
    if value.dtype.itemsize < 8:
        # The shortest decimal that round-trips in the value's own precision, so that a
        # float32 weight of 0.1 reports as 0.1, not 0.10000000149011612.
        return float(str(value.astype(np.float32)))
    return float(value)


def _flatten(tree: dict[str, Any], prefix: str, out: dict[str, float]) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}/", out)
        else:
            out[f"{prefix}{key}"] = value

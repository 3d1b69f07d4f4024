"""Guards: non-finite values and gradients are caught and named, never passed on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxreg._src.core import gather
from jaxreg._src.core.term import InputError


class NonFiniteError(InputError, FloatingPointError):
    """A loss value or gradient is NaN or infinite.

    Attributes:
      terms: the names of the terms at fault.
      where: ``{name: "value" | "gradient" | "metrics"}`` for each of them.
    """

    def __init__(self, message: str, terms: Sequence[str] = (), where: dict | None = None):
        super().__init__(message)
        self.terms = tuple(terms)
        self.where = dict(where or {})


def check_finite(out: Any, context: str = "") -> dict[str, Any]:
    """Raises ``NonFiniteError`` unless every value and the gradient are finite.

    Names each faulty term and where: its ``value``, its ``gradient`` (from its grad
    norm, when tracked) or its ``metrics``. A non-finite total gradient with no term to
    blame (norms not tracked) is reported as such. Returns ``out.to_dict()`` (one
    transfer) for reuse.

    Works on outputs whose gradient spans several processes (``jax.distributed``): the
    gradient's finiteness is reduced on device and only that flag is fetched, so every
    process must call it (as it calls the objective).
    """
    d = out.to_dict()
    entries = dict(d["regularizers"])
    if "base_loss" in d:
        entries = {out.term_names[0]: d["base_loss"], **entries}
    where = {}
    for name, e in entries.items():
        if not np.isfinite(e["value"]):
            where[name] = "value"
        elif not np.isfinite(e.get("grad_norm", 0.0)):
            where[name] = "gradient"
        elif not all(np.isfinite(list(e.get("custom", {}).values()))):
            where[name] = "metrics"
    # On device, fetching one flag: the gradient may span other processes' devices.
    grad_ok = gather.all_finite(out.grad)
    if where or not grad_ok or not np.isfinite(d["loss_total"]):
        if where:
            what = ", ".join(f"term {n!r} ({w})" for n, w in where.items())
        else:
            what = "the gradient of loss_total (track grad norms to see which term's)"
        raise NonFiniteError(
            f"non-finite values in {what}; loss_total={d['loss_total']}{context}",
            tuple(where),
            where,
        )
    return d

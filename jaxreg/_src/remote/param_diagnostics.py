"""Parameter-space gradient diagnostics from the reference service (a jaxreg extension).

In logprob space, two terms that read different tokens always have orthogonal
gradients; what matters for training is how their gradients with respect to the
*model's parameters* interact, and only the service holds the parameters. With
``forward_backward_custom(..., param_diagnostics=True)`` the client sends each term's
own linearised weights ``t_i = -dL_i/dlogprobs`` next to the usual ``weights =
-dL/dlogprobs``; the service computes every term's parameter gradient
``g_i = dL_i/dθ`` in one program (one forward, one pullback per term), accumulates
only ``sum_i w_i g_i`` (the ordinary update), and answers the Gramian
``G_ij = <g_i, g_j>``. From it:

.. math::

   \\|g_i\\| = \\sqrt{G_{ii}}, \\qquad
   \\cos(g_i, g_j) = \\frac{G_{ij}}{\\|g_i\\|\\,\\|g_j\\|}, \\qquad
   \\Big\\|\\sum_i w_i g_i\\Big\\| \\text{ (the request's gradient)}.

This is the ``param_grad_diagnostics`` extension of jaxreg's reference service
(advertised by ``GET /api/v1/capabilities``); it is not part of Tinker's API. Asking a
service without it, or the official ``tinker`` SDK, raises
[`UnsupportedExtensionError`][jaxreg.remote.UnsupportedExtensionError] before anything is sent.

Example:
  >>> import numpy as np
  >>> import jaxreg as jr
  >>> tokens = np.arange(1, 13)
  >>> inputs = {"target_tokens": tokens + 1, "weights": np.ones(12, np.float32)}
  >>> data = [jr.remote.Datum(tokens, inputs)] * 3
  >>> objective = jr.compose(
  ...     jr.Term("nll", jr.losses.cross_entropy),
  ...     [jr.Term("entropy", jr.regularizers.entropy, weight=0.01)],
  ...     term_grads=True,                           # required: each term's own gradient
  ... )
  >>> with jr.remote.ServiceClient(service_url) as client:
  ...     training = client.create_model()
  ...     result = jr.remote.forward_backward_custom(
  ...         training, data, objective, param_diagnostics=True).result()
  ...     training.delete()
  >>> d = result.param_diagnostics
  >>> d.term_names, d.space
  (('nll', 'entropy'), 'parameters')
  >>> bool(d.grad_norms["entropy"] > 0)
  True
  >>> round(d.cosine("nll", "entropy"), 3)   # on sampled tokens: exactly against the NLL
  -1.0
  >>> sorted(k for k in result.metrics if k.startswith("param/"))  # doctest: +NORMALIZE_WHITESPACE
  ['param/cos/nll/entropy', 'param/entropy/grad_norm', 'param/nll/grad_norm',
   'param/total_grad_norm']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxreg._src.core.errors import JaxregError
from jaxreg._src.core.guards import NonFiniteError
from jaxreg._src.core.term import TermError
from jaxreg._src.remote.transport import RemoteError
from jaxreg._src.remote.wire import Encoding, encode_tensor

EXTENSION = "param_grad_diagnostics"
FIELD = "param_diagnostics"
METRICS_PREFIX = "param/"


class UnsupportedExtensionError(JaxregError, RuntimeError):
    """The service (or client) cannot do what a jaxreg extension was asked for."""


@dataclasses.dataclass(frozen=True)
class ParamDiagnostics:
    """Each term's gradient w.r.t. the model's parameters, measured by the service.

    Attributes:
      term_names: the terms, in the objective's order (the base first).
      weights: ``[n]`` the loss weights ``w_i`` used for this step.
      grad_norms: ``{name: ||dL_i/dθ||}``, the L2 norm over all parameters of the
        gradient of the term's own, unweighted loss.
      gram: ``[n, n]`` float64, ``G_ij = <dL_i/dθ, dL_j/dθ>`` (computed in float32 with
        the highest matmul precision).
      total_grad_norm: ``||sum_i w_i dL_i/dθ||``, the norm of what this request added to
        the service's accumulated gradient (before clipping).
      space: always ``"parameters"``.
    """

    term_names: tuple[str, ...]
    weights: np.ndarray
    grad_norms: dict[str, float]
    gram: np.ndarray
    total_grad_norm: float
    space: str = "parameters"

    @property
    def cosines(self) -> np.ndarray:
        """``[n, n]`` cosines ``G_ij / (|g_i| |g_j|)`` (0 where a gradient is zero)."""
        norms = np.sqrt(np.maximum(np.diagonal(self.gram), 0.0))
        denom = np.outer(norms, norms)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(denom > 0, self.gram / np.where(denom > 0, denom, 1.0), 0.0)
        cos = np.where(np.isnan(self.gram), np.nan, cos)  # a non-finite gradient stays so
        return np.clip(cos, -1.0, 1.0)

    def cosine(self, a: str, b: str) -> float:
        """The cosine between the parameter gradients of terms ``a`` and ``b``."""
        i, j = self._index(a), self._index(b)
        return float(self.cosines[i, j])

    def _index(self, name: str) -> int:
        if name not in self.term_names:
            raise KeyError(f"{name!r}: not a term; terms are {list(self.term_names)}")
        return self.term_names.index(name)

    def to_dict(self) -> dict[str, Any]:
        """``{"space", "grad_norms": {name}, "grad_norms_weighted": {name},
        "total_grad_norm", "cosines": {a: {b}}}`` as plain floats."""
        cos = self.cosines
        names = self.term_names
        return {
            "space": self.space,
            "grad_norms": dict(self.grad_norms),
            "grad_norms_weighted": {
                n: float(self.weights[i]) * self.grad_norms[n] for i, n in enumerate(names)
            },
            "total_grad_norm": self.total_grad_norm,
            "cosines": {
                a: {b: float(cos[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)
            },
        }

    def metrics(self, prefix: str = METRICS_PREFIX) -> dict[str, float]:
        """Flat logger keys: ``param/<term>/grad_norm``, ``param/total_grad_norm`` and
        ``param/cos/<a>/<b>`` for every pair ``a`` before ``b`` in term order."""
        out = {f"{prefix}{n}/grad_norm": v for n, v in self.grad_norms.items()}
        out[f"{prefix}total_grad_norm"] = self.total_grad_norm
        cos, names = self.cosines, self.term_names
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                out[f"{prefix}cos/{a}/{names[j]}"] = float(cos[i, j])
        return out


def check_objective(objective: Any) -> None:
    """Raises [`TermError`][jaxreg.TermError] unless the objective gives every term's gradient."""
    if objective.host_terms:
        raise TermError(
            f"param_diagnostics=True: host terms {[t.name for t in objective.host_terms]} "
            "have no per-term gradient to send; use JAX terms, or call without "
            "param_diagnostics."
        )
    if not objective.term_grads:
        raise TermError(
            "param_diagnostics=True needs each term's own gradient: build the objective "
            "with jr.compose(..., term_grads=True) (or pass base=/regularizers=, which "
            "sets it)."
        )


def request_field(out: Any, batch: Any) -> dict[str, Any]:
    """The request's ``param_diagnostics`` field (arrays not yet encoded).

    ``term_weights[d]`` is ``-out.term_grads[:, d]`` unpadded to datum ``d``'s tokens:
    ``[n, T_d]`` or ``[n, T_d, K]``. Raises [`NonFiniteError`][jaxreg.NonFiniteError] naming the
    terms whose gradient is not finite (nothing is sent then).
    """
    names = tuple(out.term_names)
    term_grads, scalars = jax.device_get((out.term_grads, out.scalars))
    term_grads = np.asarray(term_grads, np.float32)
    bad = [names[i] for i in range(len(names)) if not np.isfinite(term_grads[i]).all()]
    if bad:
        raise NonFiniteError(
            f"param_diagnostics: terms {bad} have a non-finite gradient w.r.t. the "
            "logprobs; nothing was sent to the service",
            bad,
            {n: "gradient" for n in bad},
        )
    host = dataclasses.replace(out, scalars=np.asarray(scalars))
    terms = host.terms
    weights = [float(np.float32(terms[n].weight)) for n in names]
    per_datum = batch.unpad(np.moveaxis(term_grads, 0, 2))  # [T_d, n, (K)]
    return {
        "term_names": list(names),
        "loss_weights": weights,
        "term_weights": [-np.moveaxis(g, 1, 0) for g in per_datum],
    }


def encode_field(field: Mapping[str, Any], encoding: Encoding | str) -> dict[str, Any]:
    """``field`` with its ``term_weights`` arrays encoded as ``TensorData``."""
    return {
        "term_names": list(field["term_names"]),
        "loss_weights": [float(w) for w in field["loss_weights"]],
        "term_weights": [
            encode_tensor(np.asarray(a, np.float32), encoding)  # type: ignore[arg-type]
            for a in field["term_weights"]
        ],
    }


def parse_result(result: Mapping[str, Any], sent: Mapping[str, Any]) -> ParamDiagnostics:
    """The [`ParamDiagnostics`][jaxreg.remote.ParamDiagnostics] of a ``forward_backward`` result."""
    field = result.get(FIELD)
    names = list(sent["term_names"])
    if not isinstance(field, Mapping) or field.get("term_names") != names:
        raise RemoteError(
            f"forward_backward: the service's result has no {FIELD} for terms {names} "
            f"(found {field!r}); its capabilities listed {EXTENSION!r}",
            endpoint="forward_backward",
        )

    def num(v: Any) -> float:
        return math.nan if v is None else float(v)

    gram = np.asarray([[num(v) for v in row] for row in field["gram"]], np.float64)
    norms = [num(v) for v in field["grad_norms"]]
    return ParamDiagnostics(
        term_names=tuple(names),
        weights=np.asarray(sent["loss_weights"], np.float64),
        grad_norms=dict(zip(names, norms, strict=True)),
        gram=gram,
        total_grad_norm=num(field["total_grad_norm"]),
    )

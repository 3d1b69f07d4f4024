"""The ``param_grad_diagnostics`` extension: per-term parameter-gradient norms and Gramian.

A client that trains a composed objective ``L = sum_i w_i L_i(logprobs)`` through the
cross-entropy loss (linearisation: ``weights = -dL/dlogprobs``) can also send each
term's own linearised weights ``t_i = -dL_i/dlogprobs``. The service then computes,
in one compiled program (``jax.vjp`` of the per-token logprobs once, then its pullback
for each term's cotangent, sharing the forward), every term's gradient with respect
to the model's parameters,

.. math::

   g_i = \\nabla_\\theta \\Big[-\\sum_{b,t} t_{i,bt}\\, \\ell_{bt}(\\theta)\\Big]
       = \\nabla_\\theta L_i, \\qquad G_{ij} = \\langle g_i, g_j \\rangle,

accumulates only ``sum_i w_i g_i`` (the gradient the ordinary ``weights`` describe, no
second backward), and answers each term's norm ``sqrt(G_ii)``, the Gramian ``G`` and
the norm of the accumulated increment.

Request (an optional top-level field of ``forward_backward``, with ``loss_fn``
``cross_entropy``)::

  "param_diagnostics": {
    "term_names":   ["nll", "kl", ...],          # n distinct names
    "loss_weights": [1.0, 0.3, ...],             # n finite numbers w_i
    "term_weights": [TensorData, ...]            # one per datum: [n, T] or [n, T, K]
  }

Each datum's ``weights`` must equal ``sum_i w_i term_weights[i]`` (up to float32
rounding; checked). Result: a ``"param_diagnostics"`` field ``{space: "parameters",
term_names, loss_weights, grad_norms, gram, total_grad_norm}`` (a non-finite number is
sent as ``null``).

The number of terms is padded to a power of two (zero cotangents, zero weights), so the
compiled programs are bounded by the (batch, length, targets, terms) buckets; padding
rows are skipped at run time (``lax.cond``), so they cost no backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core.linalg import cross_gram, weighted_rows
from jaxreg._src.remote.wire import WireError, decode_tensor
from jaxreg.service import lora as lora_lib
from jaxreg.service import model as model_lib

EXTENSION = "param_grad_diagnostics"
FIELD = "param_diagnostics"
MAX_TERMS = 64
# sum_i w_i t_i is compared with the datum's weights to this relative tolerance (of
# sum_i |w_i t_i|): float32 sums of up to MAX_TERMS products round well inside it.
CONSISTENCY_RTOL = 1e-4


class DiagnosticsError(ValueError):
    """A ``param_diagnostics`` field the service refuses (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class PreparedDiagnostics:
    """A validated ``param_diagnostics`` field, padded and ready to run."""

    term_names: tuple[str, ...]
    loss_weights: np.ndarray  # [n_pad] float32, zeros past n
    term_weights: np.ndarray  # [n_pad, B, T] or [n_pad, B, T, K] float32, zeros past n


def n_bucket(n: int) -> int:
    """The padded number of terms: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def prepare(
    field: Any, *, lengths: list[int], targets: np.ndarray, weights: np.ndarray
) -> PreparedDiagnostics:
    """Validates a ``param_diagnostics`` field against a packed request.

    Args:
      field: the request's ``param_diagnostics`` value.
      lengths: each datum's token count.
      targets: the packed ``target_tokens`` ``[B, T]`` or ``[B, T, K]``.
      weights: the packed cross-entropy ``weights`` (same shape; padding is ignored).

    Raises:
      DiagnosticsError: naming the field, the expected and the found value.
    """
    if not isinstance(field, Mapping):
        raise DiagnosticsError(
            f"{FIELD}: expected an object with 'term_names', 'loss_weights' and "
            f"'term_weights', found {type(field).__name__}"
        )
    unknown = sorted(set(field) - {"term_names", "loss_weights", "term_weights"})
    if unknown:
        raise DiagnosticsError(
            f"{FIELD}: unknown fields {unknown}; expected "
            "['loss_weights', 'term_names', 'term_weights']"
        )
    names = field.get("term_names")
    if not isinstance(names, list) or not names or not all(isinstance(s, str) and s for s in names):
        raise DiagnosticsError(
            f"{FIELD}.term_names: expected a non-empty list of non-empty strings, found {names!r}"
        )
    n = len(names)
    if n > MAX_TERMS:
        raise DiagnosticsError(f"{FIELD}.term_names: at most {MAX_TERMS} terms, found {n}")
    if len(set(names)) != n:
        dup = next(s for s in names if names.count(s) > 1)
        raise DiagnosticsError(f"{FIELD}.term_names: expected distinct names, {dup!r} repeats")
    lw = field.get("loss_weights")
    if not (
        isinstance(lw, list)
        and len(lw) == n
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in lw
        )
    ):
        raise DiagnosticsError(
            f"{FIELD}.loss_weights: expected {n} finite numbers (one per term), found {lw!r}"
        )
    rows = field.get("term_weights")
    if not isinstance(rows, list) or len(rows) != len(lengths):
        found = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise DiagnosticsError(
            f"{FIELD}.term_weights: expected a list of {len(lengths)} TensorData "
            f"(one per datum), found {found}"
        )
    npad = n_bucket(n)
    k_shape = targets.shape[2:]
    packed = np.zeros((npad, *targets.shape), np.float32)
    for i, (raw, t) in enumerate(zip(rows, lengths, strict=True)):
        where = f"{FIELD}.term_weights[{i}]"
        try:
            a = decode_tensor(raw, where)
        except WireError as e:
            raise DiagnosticsError(str(e)) from None
        expected = (n, t, *k_shape)
        if a.dtype.kind != "f" or a.shape != expected:
            raise DiagnosticsError(
                f"{where}: expected float32 {list(expected)} (terms x the datum's "
                f"target_tokens), found {a.dtype}{list(a.shape)}"
            )
        if not np.isfinite(a).all():
            bad = int(np.argwhere(~np.isfinite(a).reshape(n, -1).all(axis=1))[0, 0])
            raise DiagnosticsError(f"{where}: non-finite values for term {names[bad]!r}")
        packed[:n, i, :t] = a
    w = np.asarray(lw, np.float64)
    valid = np.zeros(targets.shape[:2], bool)  # padded positions hold neutral weights
    for i, t in enumerate(lengths):
        valid[i, :t] = True
    valid = valid.reshape(valid.shape + (1,) * len(k_shape))
    given = np.where(valid, weights, 0.0).astype(np.float64)
    scaled = np.tensordot(w, packed[:n].astype(np.float64), axes=1)
    bound = np.tensordot(np.abs(w), np.abs(packed[:n].astype(np.float64)), axes=1)
    err = np.abs(scaled - given)
    tol = CONSISTENCY_RTOL * bound + 1e-6 * max(float(np.abs(given).max(initial=0.0)), 1e-30)
    if (err > tol).any():
        b = int(np.argwhere(err > tol)[0, 0])
        raise DiagnosticsError(
            f"{FIELD}.term_weights[{b}]: sum_i loss_weights[i] * term_weights[i] must equal "
            f"the datum's weights (the linearised total); largest difference "
            f"{float(err[b].max()):.3g}"
        )
    lw_pad = np.zeros(npad, np.float32)
    lw_pad[:n] = w
    return PreparedDiagnostics(tuple(names), lw_pad, packed)


def make_step(cfg: model_lib.ModelConfig, traces) -> Any:
    """The compiled ``forward_backward`` with per-term parameter gradients.

    ``step(params, grad_acc, tokens, targets, mask, weights, term_weights, loss_weights,
    n_terms)`` (``n_terms``: an int32 scalar, the rows before the padding)
    returns ``(loss, logprobs, grad_acc + sum_i w_i g_i, gram [n_pad, n_pad],
    ||sum_i w_i g_i||, ok)``; ``grad_acc`` is donated and left unchanged unless ``ok`` (the
    loss, the gradient and the Gramian are finite).
    """

    def step(params, grad_acc, tokens, targets, mask, weights, term_weights, loss_weights, n_terms):
        traces["forward_backward_param_diagnostics"] += 1
        lp, pullback = jax.vjp(
            lambda p: model_lib.token_logprobs(cfg, lora_lib.merged(p), tokens, targets), params
        )
        m = mask if lp.ndim == 2 else mask[..., None]
        loss = -jnp.sum(weights * lp * m)
        # d/dlp [-sum(t_i * lp * m)] = -t_i * m: one pullback per term, all in this one
        # program (the forward and its residuals are shared). Not ``jax.vmap(pullback)``:
        # on XLA:CPU (jax 0.10.2) that returns wrong rows for some shapes, e.g. the
        # demo's [32, 32, 32] (tests/test_param_diagnostics.py keeps that case).
        # Padding rows (past the request's terms, static count n_pad) are skipped at run
        # time, so 3 terms cost 3 backward passes, not 4.
        zeros = jax.tree.map(jnp.zeros_like, params)
        rows = [
            jax.lax.cond(
                i < n_terms,
                lambda c: pullback(c)[0],
                lambda c: zeros,
                -(term_weights[i] * m),
            )
            for i in range(term_weights.shape[0])
        ]
        jac = jax.tree.map(lambda *r: jnp.stack(r), *rows)
        grads = jax.tree.map(lambda j: weighted_rows(loss_weights, j), jac)
        flat = [j.reshape(j.shape[0], -1).astype(jnp.float32) for j in jax.tree.leaves(jac)]
        gram = sum(cross_gram(f, f) for f in flat)
        total = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        # As the plain path: a non-finite loss or gradient accumulates nothing.
        ok = jnp.isfinite(total) & jnp.isfinite(loss) & jnp.all(jnp.isfinite(gram))
        acc = jax.tree.map(lambda a, g: jnp.where(ok, a + g, a), grad_acc, grads)
        return loss, lp, acc, gram, total, ok

    return jax.jit(step, donate_argnames="grad_acc")


def result_field(prepared: PreparedDiagnostics, gram: Any, total: Any) -> dict[str, Any]:
    """The result's ``param_diagnostics`` field (plain Python numbers)."""
    n = len(prepared.term_names)
    g = np.asarray(gram, np.float64)[:n, :n]
    norms = np.sqrt(np.maximum(np.diagonal(g), 0.0))
    return {
        "space": "parameters",
        "term_names": list(prepared.term_names),
        "loss_weights": [float(v) for v in prepared.loss_weights[:n]],
        "grad_norms": _json_floats(norms),
        "gram": [_json_floats(row) for row in g],
        "total_grad_norm": _json_floats(np.asarray([total], np.float64))[0],
    }


def _json_floats(a: np.ndarray) -> list[float | None]:
    """Floats for JSON; a non-finite value (a non-finite gradient) becomes ``None``."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(a, np.float64).tolist()]

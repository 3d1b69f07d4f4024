"""The two evaluations every gradient strategy shares: the model stage and the terms.

``model_forward`` runs an objective's model stage (``plan.forward``) and splits off its
auxiliary output; ``evaluate_terms`` computes the values (stacked in one dtype by
``stack_values``) and metrics of some of the terms on their inputs. ``program`` (the
materialised strategies) and ``sequential`` both build on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxreg._src.core.errors import TermError
from jaxreg._src.core.plan import Plan


def evaluate_terms(plan: Plan, indices: Sequence[int], inputs: Any, batch: Any):
    """Values ``[len(indices)]`` and metrics of the terms at ``indices``, all on ``inputs``."""
    values, metrics = [], []
    for i in indices:
        value, custom = plan.terms[i].evaluate(inputs, batch)
        values.append(value)
        metrics.append(custom)
    return stack_values(values), metrics


def stack_values(values: list[jax.Array]) -> jax.Array:
    """The term values as one ``[n]`` array: float64 if any value is, else float32."""
    dtype = jnp.float64 if any(v.dtype == jnp.float64 for v in values) else jnp.float32
    return jnp.stack([v.astype(dtype) for v in values])


def model_forward(plan: Plan, x: Any, batch: Any) -> tuple[Any, Any]:
    """``(outputs, aux)`` of the model stage (``aux`` is ``None`` without ``has_aux``)."""
    assert plan.forward is not None
    result = plan.forward(x, batch)
    if not plan.forward_has_aux:
        return result, None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TermError(
            "forward_has_aux=True: forward must return a pair (outputs, aux); found "
            f"{type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple) else "")
            + "."
        )
    outputs, aux = result
    return outputs, jax.lax.stop_gradient(aux)


__all__ = ["evaluate_terms", "model_forward", "stack_values"]

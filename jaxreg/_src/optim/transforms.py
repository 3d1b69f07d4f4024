"""Regularizers as an optax transform: ``optax.chain(jr.transforms.regularize(...), ...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxreg._src.core.compose import compose


class RegularizeState(NamedTuple):
    """What ``regularize`` measured on its last update, one entry per term (in order).

    Attributes:
      step: the number of updates so far (the step its schedules are evaluated at).
      value: each term's unweighted value.
      weight: each term's weight (after schedules).
      contribution: ``weight * value``.
      grad_norm: the norm of each term's own gradient (NaN unless tracked).
    """

    step: jax.Array
    value: jax.Array
    weight: jax.Array
    contribution: jax.Array
    grad_norm: jax.Array


def regularize(
    terms: Sequence[Any], *, track_grad_norms: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the gradients of weighted parameter penalties to the incoming updates.

    .. math:: u \leftarrow u + \sum_i w_i \nabla_\theta r_i(\theta)

    The terms are [`jaxreg.Term`][jaxreg.Term] s (or ``{"name", "fn", "weight"}`` dicts) whose
    function takes the parameters: ``fn(params, batch)`` with ``batch`` the ``batch=``
    extra argument of ``update`` (``None`` if not given). Weights may be optax schedules,
    evaluated at the transform's own step count. The state keeps each term's last value,
    weight, contribution and grad norm (as ``optax.monitor`` keeps measurements).

    Args:
      terms: the penalties.
      track_grad_norms: also measure each term's gradient norm (one more VJP per term).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import jaxreg as jr
      >>> wd = 0.5
      >>> opt = optax.chain(
      ...     jr.transforms.regularize([jr.Term("l2", jr.regularizers.l2, weight=wd / 2)]),
      ...     optax.sgd(1.0),
      ... )   # the same updates as optax.chain(optax.add_decayed_weights(wd), sgd)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.zeros(2)}, state, params)
      >>> updates["w"].tolist()                          # -lr * wd * w
      [-0.5, 1.0]
      >>> jr.transforms.metrics(state[0], ["l2"])["l2"]["value"]   # sum(w ** 2)
      5.0
    """
    objective = compose(None, terms, track_grad_norms=track_grad_norms)
    n = len(objective.names)

    def init(params):
        del params
        zeros = jnp.zeros((n,), jnp.float32)
        return RegularizeState(
            jnp.zeros((), jnp.int32), zeros, zeros, zeros, jnp.full((n,), jnp.nan, jnp.float32)
        )

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "regularize: update(updates, state, params) needs the parameters; "
                f"terms {list(objective.names)} are functions of them"
            )
        out = objective(params, extra_args.get("batch"), step=state.step)
        updates = jax.tree.map(lambda u, g: u + g.astype(u.dtype), updates, out.grad)
        terms = [out.regularizers[name] for name in objective.names]

        def stack(field):
            return jnp.stack([jnp.asarray(getattr(t, field)).astype(jnp.float32) for t in terms])

        norms = stack("grad_norm") if track_grad_norms else state.grad_norm
        new_state = RegularizeState(
            state.step + 1, stack("value"), stack("weight"), stack("contribution"), norms
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def metrics(state: RegularizeState, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{name: {"value", "weight", "contribution", "grad_norm"}}`` from a state (host)."""
    host = jax.device_get(state)
    return {
        name: {
            f: float(getattr(host, f)[i]) for f in ("value", "weight", "contribution", "grad_norm")
        }
        for i, name in enumerate(names)
    }

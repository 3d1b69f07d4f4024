"""User code that type checkers must accept: reading a composed objective's output."""

import jax
import jax.numpy as jnp

import jaxreg as jr


def step(params: jax.Array) -> tuple[jax.Array, float, dict[str, float]]:
    nll = jr.Term("nll", lambda x, b: -jnp.mean(x))
    kl = jr.Term("kl", lambda x, b: jnp.sum(x**2), weight=0.1)
    objective = jr.compose(nll, [kl], track_grad_norms=True, grad_conflicts=True)
    out: jr.CompositeOutput = objective(params)
    base_norm: jax.Array = out.base_loss.grad_norm
    kl_share: jax.Array = out.regularizers["kl"].contribution / out.loss_total
    total: jax.Array = out.total_grad_norm
    cosines: jax.Array = out.grad_cosines
    term: jr.TermOutput = out.terms["kl"]
    arrays = out.as_arrays()
    logged: dict[str, float] = out.flat(prefix="train/")
    print(base_norm, kl_share, total, cosines[0, 1], term.weight, arrays["loss_total"])
    return out.grad, float(out.to_dict()["loss_total"]), logged

"""Base losses on padded token batches, matching the definitions of the Tinker service."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreg._src.core import axes
from jaxreg._src.core.term import InputError
from jaxreg._src.terms.batch import Batch
from jaxreg._src.terms.tokens import (
    SAMPLING_LOGPROBS,
    check_tokens,
    clean,
    expand,
    get,
    reduce,
    term_function,
    token_mean,
)


def _check_sampling_key(name: str, batch: Batch, key: str) -> None:
    """A clear error when the sampling policy's logprobs sit under the old key ``logprobs``."""
    if isinstance(batch, Batch) and key not in batch.inputs and "logprobs" in batch.inputs:
        raise InputError(
            f"{name}: batch.inputs[{key!r}] (the sampling policy's logprobs) is missing, but "
            f"batch.inputs['logprobs'] is there. jaxreg batches name the sampling policy's "
            f"logprobs {SAMPLING_LOGPROBS!r} (x is the current policy's); Tinker's "
            f"loss_fn_inputs call them 'logprobs', which forward_backward_custom renames. "
            f"Rename the input to {key!r}, or pass {name}(sampling_logprobs='logprobs')."
        )


def _per_token(values: jax.Array) -> jax.Array:
    """Sums a ``[B, T, K]`` per-candidate array over ``K``; ``[B, T]`` passes through."""
    return jnp.sum(values, axis=-1) if values.ndim == 3 else values


def _weights(name: str, x: jax.Array, batch: Batch, mask: jax.Array, key: str) -> jax.Array:
    if key in batch.inputs:
        check_tokens(name, x, batch, (key,))
        return get(batch, key, x, mask)
    return jnp.broadcast_to(expand(mask, x), x.shape)


@term_function
def cross_entropy(x: jax.Array, batch: Batch, *, reduction: str = "sum", weights: str = "weights"):
    r"""Weighted negative log-likelihood, as Tinker's ``cross_entropy`` loss.

    .. math:: L = -\sum_{b,t} m_{bt}\, w_{bt}\, x_{bt}

    (summed over ``K`` too for ``[B, T, K]`` multi-target logprobs).

    Args:
      x: logprobs of the target tokens, ``[B, T]`` or ``[B, T, K]``.
      batch: a [`jaxreg.Batch`][jaxreg.Batch]; ``batch.inputs[weights]`` (shaped like ``x``) holds
        the per-token weights; without it every real token has weight 1.
      reduction: ``"sum"`` (Tinker's), ``"token_mean"`` or ``"seq_mean"``.
      weights: the name of the weights input.

    Weight: the default ``"sum"`` grows with the number of real tokens :math:`N` (as the
    service's loss does, and learning rates tuned for it assume); each token's gradient
    is :math:`-w_{bt}` whatever the batch. A ``"token_mean"`` regularizer of weight
    :math:`\lambda` next to it pulls :math:`\lambda / N` per token; use
    ``reduction="token_mean"`` here (or ``"sum"`` on the regularizer) to make
    :math:`\lambda` a per-token ratio (docs/terms.md, "Reductions and weights").

    Returns:
      ``(loss, {"nll_per_token"})``: the loss and the weighted NLL per real token.

    Example:
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> x, batch = jr.Batch.from_ragged([np.log([0.5, 0.25]), np.log([0.5])])
      >>> loss, metrics = jr.losses.cross_entropy(x, batch)
      >>> round(float(loss), 4), round(float(metrics["nll_per_token"]), 4)  # 4 log 2, / 3
      (2.7726, 0.9242)
    """
    mask = check_tokens("cross_entropy", x, batch)
    w = _weights("cross_entropy", x, batch, mask, weights)
    per_token = _per_token(-w * clean(x, mask))
    loss = reduce("cross_entropy", per_token, mask, reduction)
    if reduction == "sum":
        per = jax.lax.stop_gradient(loss) / jnp.maximum(axes.psum(jnp.sum(mask)), 1)
    elif reduction == "token_mean":
        per = jax.lax.stop_gradient(loss)
    else:
        per = token_mean(jax.lax.stop_gradient(per_token), mask)
    return loss, {"nll_per_token": per}


@term_function
def importance_sampling(
    x: jax.Array,
    batch: Batch,
    *,
    reduction: str = "sum",
    sampling_logprobs: str = SAMPLING_LOGPROBS,
    advantages: str = "advantages",
):
    r"""Importance-sampled policy gradient, as Tinker's ``importance_sampling`` loss.

    .. math:: L = -\sum_{b,t} m_{bt}\, \exp(x_{bt} - s_{bt})\, A_{bt}

    with :math:`s` the sampling policy's logprobs and :math:`A` the advantages.

    Args:
      x: the current policy's logprobs of the sampled tokens, ``[B, T]``.
      batch: with ``inputs["sampling_logprobs"]`` (:math:`s`, the logprobs the sampler
        gave the same tokens; Tinker's ``loss_fn_inputs["logprobs"]``) and
        ``inputs["advantages"]``.
      reduction: ``"sum"`` (Tinker's), ``"token_mean"`` or ``"seq_mean"``; the weight
        note of [`cross_entropy`][jaxreg.losses.cross_entropy] applies.
      sampling_logprobs: the name of the sampling policy's logprobs input.
      advantages: the name of the advantages input.

    Returns:
      ``(loss, {"ratio_mean", "ratio_max"})``.

    Example:
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> x, batch = jr.Batch.from_ragged(
      ...     [np.log([0.5, 0.5])],
      ...     {"sampling_logprobs": [np.log([0.25, 0.5])], "advantages": [np.array([1.0, -1.0])]},
      ... )
      >>> float(jr.losses.importance_sampling(x, batch)[0])  # -(2 * 1 + 1 * -1)
      -1.0
    """
    name = "importance_sampling"
    _check_sampling_key(name, batch, sampling_logprobs)
    mask = check_tokens(name, x, batch, (sampling_logprobs, advantages), multi_target=False)
    ratio = jnp.exp(clean(x, mask) - get(batch, sampling_logprobs, x, mask)) * mask
    loss = reduce(name, -ratio * get(batch, advantages, x, mask), mask, reduction)
    return loss, _ratio_metrics(ratio, mask)


@term_function
def ppo(
    x: jax.Array,
    batch: Batch,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    reduction: str = "sum",
    sampling_logprobs: str = SAMPLING_LOGPROBS,
    advantages: str = "advantages",
):
    r"""Clipped-ratio PPO objective (Schulman et al. 2017), as Tinker's ``ppo`` loss.

    .. math::

       \rho = \exp(x - s), \qquad
       L = -\sum_{b,t} m_{bt} \min\big(\rho A,\ \mathrm{clip}(\rho, 1 - \epsilon_l,
       1 + \epsilon_h) A\big)

    with :math:`s` the sampling (old) policy's logprobs and :math:`A` the advantages.

    Args:
      x: the current policy's logprobs of the sampled tokens, ``[B, T]``.
      batch: with ``inputs["sampling_logprobs"]`` (:math:`s`; Tinker's
        ``loss_fn_inputs["logprobs"]``) and ``inputs["advantages"]``.
      clip_low: :math:`\epsilon_l` (Tinker's threshold 0.2).
      clip_high: :math:`\epsilon_h` (Tinker's threshold 0.2).
      reduction: ``"sum"`` (Tinker's), ``"token_mean"`` or ``"seq_mean"``; the weight
        note of [`cross_entropy`][jaxreg.losses.cross_entropy] applies.
      sampling_logprobs: the name of the sampling policy's logprobs input.
      advantages: the name of the advantages input.

    Returns:
      ``(loss, {"ratio_mean", "ratio_max", "clip_fraction"})``.
    """
    name = "ppo"
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise InputError(
            f"ppo: clip_low must be in [0, 1) and clip_high >= 0; "
            f"found clip_low={clip_low}, clip_high={clip_high}."
        )
    _check_sampling_key(name, batch, sampling_logprobs)
    mask = check_tokens(name, x, batch, (sampling_logprobs, advantages), multi_target=False)
    ratio = jnp.exp(clean(x, mask) - get(batch, sampling_logprobs, x, mask))
    adv = get(batch, advantages, x, mask)
    clipped = jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
    objective = jnp.minimum(ratio * adv, clipped * adv)
    loss = reduce(name, -objective, mask, reduction)
    metrics = _ratio_metrics(ratio * mask, mask)
    was_clipped = (clipped * adv < ratio * adv).astype(x.dtype)
    metrics["clip_fraction"] = token_mean(was_clipped, mask)
    return loss, metrics


def _ratio_metrics(ratio: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    return {
        "ratio_mean": token_mean(ratio, mask),
        "ratio_max": axes.pmax(jnp.max(ratio * mask)),
    }


@term_function
def dpo(
    x: jax.Array,
    batch: Batch,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    ref_logprobs: str = "ref_logprobs",
    weights: str = "weights",
):
    r"""Direct Preference Optimization (Rafailov et al. 2023) over paired datums.

    Datums come in pairs: rows ``2i`` (chosen) and ``2i + 1`` (rejected). With
    :math:`c = \sum_t w_t x_t` over the chosen row (and :math:`c_{ref}, r, r_{ref}` alike),

    .. math:: \ell_i = -\log\sigma\big(\beta\,((c - c_{ref}) - (r - r_{ref}))\big)

    Args:
      x: policy logprobs ``[B, T]`` with ``B`` even.
      batch: with ``inputs[ref_logprobs]`` (the reference model's logprobs) and optionally
        ``inputs[weights]`` (per-token weights, e.g. 0 on the prompt; default 1).
      beta: the inverse temperature :math:`\beta > 0`.
      reduction: ``"mean"`` over the pairs that hold tokens, or ``"sum"``.

    Returns:
      ``(loss, {"accuracy", "margin", "chosen_reward", "rejected_reward"})``, averaged over
      pairs; rewards are :math:`\beta (c - c_{ref})` and :math:`\beta (r - r_{ref})`.
    """
    name = "dpo"
    mask = check_tokens(name, x, batch, (ref_logprobs,), multi_target=False)
    if x.shape[0] % 2:
        raise InputError(
            f"dpo: datums must come in (chosen, rejected) pairs, so B must be even; "
            f"found B = {x.shape[0]}."
        )
    if beta <= 0:
        raise InputError(f"dpo: beta must be positive; found {beta}.")
    if reduction not in ("mean", "sum"):
        raise InputError(f"dpo: reduction must be 'mean' or 'sum'; found {reduction!r}.")
    w = _weights(name, x, batch, mask, weights) * mask
    seq = jnp.sum(w * clean(x, mask), axis=1)
    ref = jnp.sum(w * get(batch, ref_logprobs, x, mask), axis=1)
    rewards = beta * (seq - ref)
    chosen, rejected = rewards[0::2], rewards[1::2]
    margin = chosen - rejected
    losses = -jax.nn.log_sigmoid(margin)
    real = (jnp.sum(mask, axis=1).reshape(-1, 2).sum(axis=1) > 0).astype(x.dtype)
    loss = token_mean(losses, real) if reduction == "mean" else jnp.sum(losses * real)

    def avg(v):
        return token_mean(v, real)

    return loss, {
        "accuracy": avg((margin > 0).astype(x.dtype)),
        "margin": avg(margin),
        "chosen_reward": avg(chosen),
        "rejected_reward": avg(rejected),
    }

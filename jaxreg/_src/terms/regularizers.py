"""Regularizers on padded token batches (and, for the norms, on any parameter pytree)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxreg._src.core.term import InputError
from jaxreg._src.terms.batch import Batch
from jaxreg._src.terms.tokens import (
    check_tokens,
    clean,
    get,
    reduce,
    term_function,
    token_mean,
    token_stats,
)

DIRECTIONS = ("forward", "reverse", "symmetric")
ESTIMATORS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------- norms


def _masked_leaves(name: str, x: Any, batch: Any, center: Any) -> list[jax.Array]:
    """``x - center`` leaf by leaf, with padded tokens zeroed when ``x`` is a token array."""
    if isinstance(center, str):
        if not isinstance(batch, Batch):
            raise InputError(
                f"{name}: center={center!r} names a batch input, but batch is "
                f"{type(batch).__name__}, not a jaxreg.Batch."
            )
        check_tokens(name, x, batch, (center,))
        center = batch.inputs[center].astype(x.dtype)
    if center is None:
        diff = x
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(center)) and jnp.ndim(center) == 0:
        c = jnp.asarray(center)
        diff = jax.tree.map(lambda a: a - c.astype(a.dtype), x)
    else:
        if str(jax.tree.structure(center)) != str(jax.tree.structure(x)):
            raise InputError(
                f"{name}: center must be a scalar, a batch input name or a pytree shaped "
                f"like x; found structure {jax.tree.structure(center)}, expected "
                f"{jax.tree.structure(x)}."
            )
        diff = jax.tree.map(lambda a, c: a - c.astype(a.dtype), x, center)
    if (
        isinstance(batch, Batch)
        and isinstance(diff, jax.Array)
        and diff.ndim >= 2
        and diff.shape[:2] == batch.mask.shape
    ):
        return [clean(diff, batch.mask.astype(diff.dtype))]
    return jax.tree.leaves(diff)


def _sum(leaves: list[jax.Array], fn) -> jax.Array:
    return sum((jnp.sum(fn(a)) for a in leaves), start=jnp.zeros((), leaves[0].dtype))


@term_function
def l1(x: Any, batch: Any = None, *, center: Any = None):
    r"""L1 penalty :math:`\sum |x - c|` over every element (real tokens only for a batch).

    Args:
      x: any pytree (parameters), or token logprobs ``[B, T(, K)]`` with a
        [`jaxreg.Batch`][jaxreg.Batch], whose padded positions are then left out.
      batch: unused except for the mask (and ``center`` when it names an input).
      center: ``None`` (0), a scalar, a pytree shaped like ``x``, or the name of a batch
        input.

    Returns:
      ``(loss, {"max_abs"})``.
    """
    leaves = _masked_leaves("l1", x, batch, center)
    return _sum(leaves, jnp.abs), {
        "max_abs": jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in leaves]))
    }


@term_function
def l2(x: Any, batch: Any = None, *, center: Any = None):
    r"""Squared L2 penalty :math:`\sum (x - c)^2` (no 1/2: weight ``wd / 2`` is decay ``wd``).

    Args:
      x: any pytree (parameters), or token logprobs with a [`jaxreg.Batch`][jaxreg.Batch].
      center: ``None`` (0), a scalar, a pytree shaped like ``x`` (e.g. the initial
        parameters, for L2-SP), or the name of a batch input.

    Returns:
      ``(loss, {"norm"})`` with ``norm`` the L2 norm :math:`\|x - c\|_2`.
    """
    leaves = _masked_leaves("l2", x, batch, center)
    value = _sum(leaves, jnp.square)
    return value, {"norm": jnp.sqrt(jax.lax.stop_gradient(value))}


@term_function
def elastic_net(x: Any, batch: Any = None, *, l1_ratio: float = 0.5, center: Any = None):
    r"""Elastic net :math:`\alpha \sum |x - c| + (1 - \alpha) \sum (x - c)^2`.

    Args:
      l1_ratio: :math:`\alpha \in [0, 1]`.
      center: as for [`l2`][jaxreg.regularizers.l2].

    Returns:
      ``(loss, {"l1", "l2"})``, the two unmixed parts.
    """
    if not 0 <= l1_ratio <= 1:
        raise InputError(f"elastic_net: l1_ratio must be in [0, 1]; found {l1_ratio}.")
    leaves = _masked_leaves("elastic_net", x, batch, center)
    a, b = _sum(leaves, jnp.abs), _sum(leaves, jnp.square)
    return l1_ratio * a + (1 - l1_ratio) * b, {"l1": a, "l2": b}


# ------------------------------------------------------------------------- entropy


def _mean(value: jax.Array, per_token: jax.Array, mask: jax.Array, reduction: str):
    """The per-token mean, free when the loss already is it."""
    if reduction == "token_mean":
        return jax.lax.stop_gradient(value)
    return token_mean(jax.lax.stop_gradient(per_token), mask)


def _candidate_logprobs(x: jax.Array, mask: jax.Array, renormalize: bool) -> jax.Array:
    x = clean(x, mask)
    return jax.nn.log_softmax(x, axis=-1) if renormalize else x


def _entropy_per_token(x: jax.Array, mask: jax.Array, renormalize: bool) -> jax.Array:
    if x.ndim == 2:
        return -clean(x, mask)
    logp = _candidate_logprobs(x, mask, renormalize)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@term_function
def entropy(
    x: jax.Array,
    batch: Batch,
    *,
    mode: str = "maximize",
    renormalize: bool = False,
    reduction: str = "token_mean",
):
    r"""Entropy of the policy, to maximise (an exploration bonus) or minimise.

    For ``[B, T]`` logprobs of sampled tokens, the per-token entropy is the sampled-token
    estimate :math:`\hat H_t = -x_t` (unbiased when tokens are drawn from the policy). For
    ``[B, T, K]`` logprobs of ``K`` candidates, it is :math:`H_t = -\sum_k p_k \log p_k`,
    with :math:`p = \exp(x)`, or :math:`p = \mathrm{softmax}(x)` if ``renormalize``.

    The loss is :math:`-H` for ``mode="maximize"`` and :math:`H` for ``"minimize"``.

    Returns:
      ``(loss, {"mean"})``: the mean per-token entropy.
    """
    if mode not in ("maximize", "minimize"):
        raise InputError(f"entropy: mode must be 'maximize' or 'minimize'; found {mode!r}.")
    mask = check_tokens("entropy", x, batch)
    h = _entropy_per_token(x, mask, renormalize)
    value = reduce("entropy", h, mask, reduction)
    return (-value if mode == "maximize" else value), {"mean": _mean(value, h, mask, reduction)}


# ------------------------------------------------------------------------- KL


def _kl_per_token(
    x: jax.Array,
    ref: jax.Array,
    mask: jax.Array,
    direction: str,
    estimator: str,
    clip: float,
    renormalize: bool,
) -> jax.Array:
    if x.ndim == 3:
        logp = _candidate_logprobs(x, mask, renormalize)
        logq = _candidate_logprobs(ref, mask, renormalize)
        p, q = jnp.exp(logp), jnp.exp(logq)
        forward = jnp.sum(q * (logq - logp), axis=-1)
        reverse = jnp.sum(p * (logp - logq), axis=-1)
    else:
        # Tokens sampled from the policy; log ratio r - x, clipped for stability.
        log_ratio = jnp.clip(clean(ref, mask) - clean(x, mask), -clip, clip)
        ratio = jnp.exp(log_ratio)
        if estimator == "k1":
            reverse = -log_ratio
        elif estimator == "k2":
            reverse = 0.5 * jnp.square(log_ratio)
        else:
            reverse = ratio - log_ratio - 1
        forward = ratio * log_ratio - ratio + 1
    if direction == "forward":
        return forward
    if direction == "reverse":
        return reverse
    return forward + reverse


@term_function
def kl(
    x: jax.Array,
    batch: Batch,
    *,
    ref: str = "ref_logprobs",
    direction: str = "reverse",
    estimator: str = "k3",
    clip: float = 20.0,
    renormalize: bool = False,
    reduction: str = "token_mean",
    where: str | None = None,
):
    r"""KL divergence between the policy :math:`p` and a reference :math:`q` in the batch.

    ``direction``: ``"reverse"`` :math:`KL(p\|q)`, ``"forward"`` :math:`KL(q\|p)`, or
    ``"symmetric"`` (their sum, Jeffreys' divergence).

    For ``[B, T, K]`` logprobs over ``K`` candidates the KL is exact per token. For
    ``[B, T]`` logprobs of tokens sampled from the policy it is estimated per token from
    the log ratio :math:`\ell = q_t - x_t` (clipped to ``[-clip, clip]``):
    reverse with ``estimator`` ``"k1"`` :math:`-\ell`, ``"k2"`` :math:`\ell^2/2` or
    ``"k3"`` :math:`e^{\ell} - \ell - 1` (Schulman 2020; non-negative, low variance);
    forward as :math:`e^{\ell}\ell - e^{\ell} + 1` (importance-weighted, non-negative).

    Args:
      ref: the name of the reference logprobs input, shaped like ``x``.
      where: optionally, the name of a ``[B, T]`` 0/1 input that restricts the KL (and
        its reduction) to the tokens where it is 1, e.g. to anchor the model on
        replayed data of its old skills while the base loss trains a new one.

    Returns:
      ``(loss, {"mean", "max", "min"})``: per-token KL statistics over real tokens.

    Example:
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> x, batch = jr.Batch.from_ragged(            # the policy's logprobs, 2 datums
      ...     [np.log(np.float32([0.5, 0.25])), np.log(np.float32([0.5]))],
      ...     {"ref_logprobs": [np.log(np.float32([0.25, 0.25])), np.log(np.float32([0.5]))]},
      ... )
      >>> loss, metrics = jr.regularizers.kl(x, batch, estimator="k1")   # -l = [log 2, 0, 0]
      >>> round(float(loss), 4), round(float(metrics["max"]), 4)         # token mean, max
      (0.231, 0.6931)
      >>> objective = jr.compose(
      ...     jr.Term("nll", jr.losses.cross_entropy),
      ...     [jr.Term("kl", jr.regularizers.kl("ref_logprobs"), weight=0.1)],   # k3
      ... )
      >>> round(objective(x, batch).to_dict()["regularizers"]["kl"]["value"], 4)
      0.0644
    """
    if direction not in DIRECTIONS:
        raise InputError(f"kl: direction must be one of {DIRECTIONS}; found {direction!r}.")
    if estimator not in ESTIMATORS:
        raise InputError(f"kl: estimator must be one of {ESTIMATORS}; found {estimator!r}.")
    mask = check_tokens("kl", x, batch, (ref,) if where is None else (ref, where))
    if where is not None:
        if batch.inputs[where].shape != mask.shape:
            raise InputError(
                f"kl: batch.inputs[{where!r}] (where) must be [B, T] = {tuple(mask.shape)}; "
                f"found {tuple(batch.inputs[where].shape)}."
            )
        mask = mask * (batch.inputs[where] != 0).astype(mask.dtype)
    if batch.inputs[ref].shape != x.shape:
        raise InputError(
            f"kl: batch.inputs[{ref!r}] must be shaped like x {tuple(x.shape)}; "
            f"found {tuple(batch.inputs[ref].shape)}."
        )
    per = _kl_per_token(x, get(batch, ref, x, mask), mask, direction, estimator, clip, renormalize)
    value = reduce("kl", per, mask, reduction)
    return value, {"mean": _mean(value, per, mask, reduction), **token_stats(per, mask)}


@term_function
def consistency(
    x: jax.Array,
    batch: Batch,
    *,
    other: str | None = None,
    kind: str = "mse",
    reduction: str = "token_mean",
):
    r"""Consistency between two views of the same data.

    With ``other=None`` the views are adjacent datums (rows ``2i`` and ``2i + 1``, both
    differentiated); otherwise ``x`` is compared with ``batch.inputs[other]`` (held fixed).
    ``kind="mse"``: :math:`(a - b)^2` per token (summed over ``K``); ``kind="kl"``: the
    symmetric KL of [`kl`][jaxreg.regularizers.kl] between the views.

    Returns:
      ``(loss, {"max"})``: the largest per-token discrepancy.
    """
    if kind not in ("mse", "kl"):
        raise InputError(f"consistency: kind must be 'mse' or 'kl'; found {kind!r}.")
    mask = check_tokens("consistency", x, batch, () if other is None else (other,))
    xc = clean(x, mask)
    if other is None:
        if x.shape[0] % 2:
            raise InputError(
                f"consistency: with other=None the views are datum pairs, so B must be even; "
                f"found B = {x.shape[0]}."
            )
        a, b = xc[0::2], xc[1::2]
        m = mask[0::2] * mask[1::2]
    else:
        a, b, m = xc, jax.lax.stop_gradient(get(batch, other, x, mask)), mask
    if kind == "mse":
        sq = jnp.square(a - b)
        per = jnp.sum(sq, axis=-1) if sq.ndim == 3 else sq
    else:
        per = _kl_per_token(a, b, m, "symmetric", "k3", 20.0, False)
    return reduce("consistency", per, m, reduction), {"max": token_stats(per, m)["max"]}


@term_function
def smoothness(x: jax.Array, batch: Batch, *, reduction: str = "token_mean"):
    r"""Smoothness along the sequence: :math:`\sum_t (x_t - x_{t-1})^2` over pairs of
    consecutive real tokens (summed over ``K`` for ``[B, T, K]``).

    Returns:
      ``(loss, {"max"})``: the largest squared difference.
    """
    mask = check_tokens("smoothness", x, batch)
    xc = clean(x, mask)
    diff = jnp.square(xc[:, 1:] - xc[:, :-1])
    per = jnp.sum(diff, axis=-1) if diff.ndim == 3 else diff
    m = mask[:, 1:] * mask[:, :-1]
    return reduce("smoothness", per, m, reduction), {"max": token_stats(per, m)["max"]}


@term_function
def confidence_penalty(
    x: jax.Array, batch: Batch, *, max_prob: float = 0.9, reduction: str = "token_mean"
):
    r"""Penalises over-confident tokens: :math:`\sum_t \max(0, x_t - \log p_{max})`.

    Pushes down the logprob of every token (or candidate, for ``[B, T, K]``) whose
    probability exceeds ``max_prob``; zero (and zero gradient) below it.

    Returns:
      ``(loss, {"over_fraction"})``: the fraction of real tokens above ``max_prob``.
    """
    if not 0 < max_prob <= 1:
        raise InputError(f"confidence_penalty: max_prob must be in (0, 1]; found {max_prob}.")
    mask = check_tokens("confidence_penalty", x, batch)
    excess = jax.nn.relu(clean(x, mask) - jnp.log(jnp.asarray(max_prob, x.dtype)))
    per = jnp.sum(excess, axis=-1) if excess.ndim == 3 else excess
    over = (per > 0).astype(x.dtype)
    return reduce("confidence_penalty", per, mask, reduction), {
        "over_fraction": jnp.sum(over * mask) / jnp.maximum(jnp.sum(mask), 1)
    }


@term_function
def length_penalty(x: jax.Array, batch: Batch, *, max_length: int = 64):
    r"""Discourages long sequences: :math:`\sum_{b,\ t \ge L} m_{bt}\, x_{bt}`.

    Minimising it lowers the probability of every real token at position ``>= max_length``
    (:math:`L`), so the policy learns to finish earlier. Zero for shorter sequences.

    Returns:
      ``(loss, {"over_length_fraction"})``: the fraction of sequences longer than ``L``.
    """
    if max_length < 0:
        raise InputError(f"length_penalty: max_length must be >= 0; found {max_length}.")
    mask = check_tokens("length_penalty", x, batch)
    late = (jnp.arange(x.shape[1]) >= max_length).astype(x.dtype)[None, :] * mask
    xc = clean(x, mask)
    per = jnp.sum(xc, axis=-1) if xc.ndim == 3 else xc
    lengths = jnp.sum(mask, axis=1)
    return jnp.sum(per * late), {
        "over_length_fraction": jnp.mean((lengths > max_length).astype(x.dtype))
    }

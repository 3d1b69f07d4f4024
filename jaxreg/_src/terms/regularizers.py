"""Regularizers on padded token batches (and, for the norms, on any parameter pytree)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import axes
from jaxreg._src.core.term import InputError
from jaxreg._src.terms.batch import Batch
from jaxreg._src.terms.pytrees import params_only
from jaxreg._src.terms.tokens import (
    check_dense,
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


def _flag(name: str, value: Any) -> bool:
    """One leaf of a ``mask=`` pytree as a Python bool (masks are static, as in optax)."""
    if isinstance(value, jax.core.Tracer):
        raise InputError(
            f"{name}: mask leaves must be Python bools (or concrete arrays); found a traced "
            f"{value.dtype} array. Build the mask from the parameters' structure or shapes, "
            "e.g. mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p)."
        )
    array = np.asarray(value)
    if array.dtype != np.bool_ or array.size != 1:
        raise InputError(
            f"{name}: mask leaves must be bools (True: penalise the leaf); found "
            f"{array.dtype} of shape {array.shape}."
        )
    return bool(array)


def _selection(name: str, x: Any, mask: Any, n: int) -> list[bool]:
    """Which of ``x``'s ``n`` leaves the penalty covers, from an optax-style ``mask``."""
    if mask is None:
        return [True] * n
    if callable(mask):
        mask = mask(x)
    try:
        spread = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: _flag(name, m), sub), mask, x)
    except (ValueError, TypeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(
            f"{name}: mask must be a pytree of bools with the structure of x (or a prefix "
            f"of it), or a callable x -> such a pytree; found structure "
            f"{jax.tree.structure(mask)}, expected {jax.tree.structure(x)}."
        ) from None
    flags = jax.tree.leaves(spread)
    if len(flags) != n:
        raise InputError(
            f"{name}: mask must select among the {n} leaves of x; it covers {len(flags)} "
            f"(structure {jax.tree.structure(mask)}, expected {jax.tree.structure(x)})."
        )
    return flags


def _is_float(a: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _penalised_leaves(
    name: str, x: Any, batch: Any, center: Any, mask: Any
) -> tuple[list[jax.Array], Any]:
    """``x - center`` for each penalised leaf, and the dtype of the penalty.

    A leaf is penalised when ``mask`` selects it and it is floating: integer and boolean
    leaves (step counters, RNG keys' data, flags) carry no gradient and are skipped.
    Padded tokens are zeroed when ``x`` is a token array with its [`Batch`][jaxreg.Batch].
    """
    x, center = params_only(name, x), params_only(name, center, warn=False)  # nnx: Params only
    if isinstance(center, str):
        if not isinstance(batch, Batch):
            raise InputError(
                f"{name}: center={center!r} names a batch input, but batch is "
                f"{type(batch).__name__}, not a jaxreg.Batch."
            )
        check_tokens(name, x, batch, (center,))
        center = batch.inputs[center].astype(x.dtype)
    leaves = jax.tree.leaves(x)
    keep = _selection(name, x, mask, len(leaves))
    if center is None:
        centers: list[Any] = [None] * len(leaves)
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(center)) and jnp.ndim(center) == 0:
        centers = [jnp.asarray(center)] * len(leaves)
    else:
        if str(jax.tree.structure(center)) != str(jax.tree.structure(x)):
            raise InputError(
                f"{name}: center must be a scalar, a batch input name or a pytree shaped "
                f"like x; found structure {jax.tree.structure(center)}, expected "
                f"{jax.tree.structure(x)}."
            )
        centers = jax.tree.leaves(center)
    floats = [a for a in leaves if _is_float(a)]
    dtype = functools.reduce(jnp.promote_types, [a.dtype for a in floats], jnp.float32)
    if floats:
        dtype = functools.reduce(jnp.promote_types, [a.dtype for a in floats])
    diffs = [
        a if c is None else a - c.astype(a.dtype)
        for a, c, k in zip(leaves, centers, keep, strict=True)
        if k and _is_float(a) and jnp.size(a)
    ]
    if (
        isinstance(batch, Batch)
        and len(leaves) == 1
        and len(diffs) == 1
        and diffs[0].ndim >= 2
        and diffs[0].shape[:2] == batch.mask.shape
    ):
        diffs = [clean(diffs[0], batch.mask.astype(diffs[0].dtype))]
    return diffs, dtype


def _sum(leaves: list[jax.Array], fn, dtype) -> jax.Array:
    return sum((jnp.sum(fn(a)).astype(dtype) for a in leaves), start=jnp.zeros((), dtype))


@term_function
def l1(x: Any, batch: Any = None, *, center: Any = None, mask: Any = None):
    r"""L1 penalty :math:`\sum |x - c|` over every element (real tokens only for a batch).

    Args:
      x: any pytree (parameters), or token logprobs ``[B, T(, K)]`` with a
        [`jaxreg.Batch`][jaxreg.Batch], whose padded positions are then left out.
      batch: unused except for the mask (and ``center`` when it names an input).
      center: ``None`` (0), a scalar, a pytree shaped like ``x``, or the name of a batch
        input.
      mask: which leaves to penalise, as in ``optax.add_decayed_weights(mask=...)``:
        a pytree of bools shaped like ``x`` (or a prefix of it), or a callable
        ``x -> pytree of bools``. ``None``: every leaf. Integer and boolean leaves (a
        step counter) are always skipped.

    Returns:
      ``(loss, {"max_abs"})``.

    Weight: the penalty is a sum, so it grows with the number of parameters, not with
    the batch; a weight :math:`w` adds :math:`w\,\mathrm{sign}(x - c)` to each gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0])}
      >>> float(jr.regularizers.l1(params)[0])
      6.0
      >>> no_bias = jr.regularizers.l1(mask=lambda p: {"w": True, "b": False})
      >>> float(no_bias(params)[0])
      3.0
    """
    leaves, dtype = _penalised_leaves("l1", x, batch, center, mask)
    top = [axes.pmax(jnp.max(jnp.abs(a)).astype(dtype)) for a in leaves]
    return _sum(leaves, jnp.abs, dtype), {
        "max_abs": jnp.max(jnp.stack(top)) if top else jnp.zeros((), dtype)
    }


@term_function
def l2(x: Any, batch: Any = None, *, center: Any = None, mask: Any = None):
    r"""Squared L2 penalty :math:`\sum (x - c)^2` (no 1/2: weight ``wd / 2`` is decay ``wd``).

    Args:
      x: any pytree (parameters), or token logprobs with a [`jaxreg.Batch`][jaxreg.Batch].
      center: ``None`` (0), a scalar, a pytree shaped like ``x`` (e.g. the initial
        parameters, for L2-SP), or the name of a batch input.
      mask: as for [`l1`][jaxreg.regularizers.l1].

    Returns:
      ``(loss, {"norm"})`` with ``norm`` the L2 norm :math:`\|x - c\|_2`.

    Weight: a weight :math:`w` adds :math:`2w(x - c)` to the gradient, the update of
    weight decay :math:`2w` (``optax.add_decayed_weights(2 * w)``).

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> params = {"dense": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "step": jnp.array(7)}
      >>> weights_only = jr.regularizers.l2(mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))
      >>> float(weights_only(params)[0])  # the bias and the integer step are left out
      4.0
    """
    leaves, dtype = _penalised_leaves("l2", x, batch, center, mask)
    value = _sum(leaves, jnp.square, dtype)
    return value, {"norm": jnp.sqrt(jax.lax.stop_gradient(value))}


@term_function
def elastic_net(
    x: Any, batch: Any = None, *, l1_ratio: float = 0.5, center: Any = None, mask: Any = None
):
    r"""Elastic net :math:`\alpha \sum |x - c| + (1 - \alpha) \sum (x - c)^2`.

    Args:
      l1_ratio: :math:`\alpha \in [0, 1]`.
      center: as for [`l2`][jaxreg.regularizers.l2].
      mask: as for [`l1`][jaxreg.regularizers.l1].

    Returns:
      ``(loss, {"l1", "l2"})``, the two unmixed parts.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> loss, parts = jr.regularizers.elastic_net(0.25)({"w": jnp.array([1.0, -3.0])})
      >>> float(loss), float(parts["l1"]), float(parts["l2"])
      (8.5, 4.0, 10.0)
    """
    if not 0 <= l1_ratio <= 1:
        raise InputError(f"elastic_net: l1_ratio must be in [0, 1]; found {l1_ratio}.")
    leaves, dtype = _penalised_leaves("elastic_net", x, batch, center, mask)
    a, b = _sum(leaves, jnp.abs, dtype), _sum(leaves, jnp.square, dtype)
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


def _weighted_log(p: jax.Array, log_term: jax.Array) -> jax.Array:
    """``p * log_term`` with ``0 log 0 = 0``: classes of probability 0 (logits of -inf,
    e.g. masked classes) add nothing, and no NaN reaches the value or the gradient."""
    return p * jnp.where(p > 0, log_term, jnp.zeros((), log_term.dtype))


def _entropy_per_token(x: jax.Array, mask: jax.Array, renormalize: bool) -> jax.Array:
    if x.ndim == 2:
        return -clean(x, mask)
    logp = _candidate_logprobs(x, mask, renormalize)
    return -jnp.sum(_weighted_log(jnp.exp(logp), logp), axis=-1)


@term_function
def entropy(
    x: jax.Array,
    batch: Any = None,
    *,
    mode: str = "maximize",
    renormalize: bool | None = None,
    reduction: str = "token_mean",
):
    r"""Entropy of the policy (or classifier), to maximise (an exploration bonus) or minimise.

    Token logprobs come with a [`jaxreg.Batch`][jaxreg.Batch]. For ``[B, T]`` logprobs of sampled
    tokens, the per-token entropy is the sampled-token estimate :math:`\hat H_t = -x_t`
    (unbiased when tokens are drawn from the policy). For ``[B, T, K]`` logprobs of ``K``
    candidates, it is :math:`H_t = -\sum_k p_k \log p_k`, with :math:`p = \exp(x)`, or
    :math:`p = \mathrm{softmax}(x)` if ``renormalize``.

    Classifier outputs ``[B, K]`` come without a Batch (``batch=None``, or the data dict
    of a model stage): :math:`H_b = -\sum_k p_{bk} \log p_{bk}` with
    :math:`p_b = \mathrm{softmax}(x_b)`, so ``x`` may be logits or log-probabilities
    (``renormalize`` defaults to True here; ``log_softmax`` leaves log-probabilities
    unchanged). Each row is one prediction: ``"token_mean"`` averages over rows.

    The loss is :math:`-H` for ``mode="maximize"`` and :math:`H` for ``"minimize"``.

    Weight: the default ``reduction="token_mean"`` makes the value a per-token (per-row)
    average, so a weight :math:`w` is a bonus of :math:`w` nats per unit of mean entropy
    whatever the batch size; next to a ``"sum"`` loss over :math:`N` tokens it pulls
    :math:`N` times less per token than the same weight would with ``reduction="sum"``
    (see docs/terms.md, "Reductions and weights").

    Returns:
      ``(loss, {"mean"})``: the mean per-token (per-row) entropy.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> logits = jnp.array([[0.0, 0.0], [0.0, 100.0]])  # uniform, then certain
      >>> loss, metrics = jr.regularizers.entropy(logits)
      >>> round(float(metrics["mean"]), 4), round(float(loss), 4)  # log(2) / 2
      (0.3466, -0.3466)
    """
    if mode not in ("maximize", "minimize"):
        raise InputError(f"entropy: mode must be 'maximize' or 'minimize'; found {mode!r}.")
    if isinstance(batch, Batch):
        mask = check_tokens("entropy", x, batch)
        renormalize = bool(renormalize)
    else:
        x, mask = check_dense("entropy", x, batch)
        renormalize = True if renormalize is None else renormalize
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
        forward = jnp.sum(_weighted_log(q, logq - logp), axis=-1)
        reverse = jnp.sum(_weighted_log(p, logp - logq), axis=-1)
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


def _dense_input(name: str, field: str, value: Any, batch: Any, shape, dtype) -> jax.Array:
    """An input of a classifier-output term: a key of the batch dict, or an array."""
    if isinstance(value, str):
        if not isinstance(batch, Mapping) or value not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise InputError(
                f"{name}: {field}={value!r} names a batch input, but the batch holds none "
                f"(found {found}). Without a jaxreg.Batch, pass {field} as an array, or a "
                f"batch dict with the key {value!r}."
            )
        value = batch[value]
    if tuple(getattr(value, "shape", ())) != tuple(shape):
        raise InputError(
            f"{name}: {field} must be shaped {tuple(shape)}; found shape "
            f"{tuple(getattr(value, 'shape', ()))}."
        )
    return jnp.asarray(value).astype(dtype)


@term_function
def kl(
    x: jax.Array,
    batch: Any = None,
    *,
    ref: Any = "ref_logprobs",
    direction: str = "reverse",
    estimator: str = "k3",
    clip: float = 20.0,
    renormalize: bool | None = None,
    reduction: str = "token_mean",
    where: Any = None,
):
    r"""KL divergence between the policy :math:`p` and a reference :math:`q`.

    ``direction``: ``"reverse"`` :math:`KL(p\|q)`, ``"forward"`` :math:`KL(q\|p)`, or
    ``"symmetric"`` (their sum, Jeffreys' divergence).

    Token logprobs come with a [`jaxreg.Batch`][jaxreg.Batch] whose ``inputs[ref]`` is shaped like
    ``x``. For ``[B, T, K]`` logprobs over ``K`` candidates the KL is exact per token. For
    ``[B, T]`` logprobs of tokens sampled from the policy it is estimated per token from
    the log ratio :math:`\ell = q_t - x_t` (clipped to ``[-clip, clip]``):
    reverse with ``estimator`` ``"k1"`` :math:`-\ell`, ``"k2"`` :math:`\ell^2/2` or
    ``"k3"`` :math:`e^{\ell} - \ell - 1` (Schulman 2020; non-negative, low variance);
    forward as :math:`e^{\ell}\ell - e^{\ell} + 1` (importance-weighted, non-negative).

    Classifier outputs ``[B, K]`` come without a Batch: ``ref`` is then an array shaped
    like ``x`` or a key of the batch dict, and the KL is exact per row between
    :math:`\mathrm{softmax}(x_b)` and :math:`\mathrm{softmax}(q_b)` (logits or
    log-probabilities; ``renormalize`` defaults to True here), averaged over rows.

    Args:
      ref: the reference logprobs (or logits): the name of an input shaped like ``x``,
        or, for classifier outputs, an array.
      where: optionally, the name of a ``[B, T]`` 0/1 input (``[B]`` for classifier
        outputs, or such an array) that restricts the KL (and its reduction) to the
        tokens where it is 1, e.g. to anchor the model on replayed data of its old
        skills while the base loss trains a new one.
      reduction: ``"token_mean"`` (default), ``"sum"`` or ``"seq_mean"``.

    Weight: with ``"token_mean"`` the value is the mean KL per token, so a weight
    :math:`w` costs :math:`w` per nat of mean KL whatever the batch size. Next to a
    ``"sum"`` loss over :math:`N` tokens that is :math:`w/N` per token; for the
    per-token coefficient :math:`\beta` of RLHF write ``kl(reduction="sum")`` with
    weight :math:`\beta` (see docs/terms.md, "Reductions and weights").

    Returns:
      ``(loss, {"mean", "max", "min"})``: per-token KL statistics over real tokens.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> student = jnp.log(jnp.array([[0.5, 0.5]]))
      >>> teacher = jnp.log(jnp.array([[0.9, 0.1]]))
      >>> loss, _ = jr.regularizers.kl(ref=teacher)(student)  # KL(student || teacher)
      >>> round(float(loss), 5)  # 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1)
      0.51083
    """
    if direction not in DIRECTIONS:
        raise InputError(f"kl: direction must be one of {DIRECTIONS}; found {direction!r}.")
    if estimator not in ESTIMATORS:
        raise InputError(f"kl: estimator must be one of {ESTIMATORS}; found {estimator!r}.")
    if not isinstance(batch, Batch):
        shape = tuple(getattr(x, "shape", ()))
        x, mask = check_dense("kl", x, batch)
        q = _dense_input("kl", "ref", ref, batch, shape, x.dtype).reshape(x.shape)
        if where is not None:
            keep = _dense_input("kl", "where", where, batch, shape[:-1], x.dtype)
            mask = mask * (keep != 0).astype(mask.dtype).reshape(mask.shape)
        renormalize = True if renormalize is None else renormalize
        per = _kl_per_token(x, q, mask, direction, estimator, clip, renormalize)
        value = reduce("kl", per, mask, reduction)
        return value, {"mean": _mean(value, per, mask, reduction), **token_stats(per, mask)}
    if not isinstance(ref, str) or (where is not None and not isinstance(where, str)):
        raise InputError(
            f"kl: with a jaxreg.Batch, ref and where name batch inputs; found "
            f"ref={type(ref).__name__}, where={type(where).__name__}."
        )
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
    q = get(batch, ref, x, mask)
    per = _kl_per_token(x, q, mask, direction, estimator, clip, bool(renormalize))
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
        "over_fraction": token_mean(over, mask)
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
        "over_length_fraction": token_mean(
            (lengths > max_length).astype(x.dtype), jnp.ones_like(lengths, dtype=x.dtype)
        )
    }

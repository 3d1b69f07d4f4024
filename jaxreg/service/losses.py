"""The service's built-in policy-gradient losses: ``ppo``, ``cispo``, ``dro``, ``stable_reinforce``.

With ``lp`` the learner's per-token logprobs, ``q`` the sampler's (``logprobs``),
``A`` the ``advantages`` and ``r = exp(lp - q)`` the importance ratio, summed over the
unpadded tokens (Tinker's token-wise definitions, ``loss:sum``):

* ``importance_sampling``: ``-sum(r * A)`` (in ``jaxreg.service.steps``);
* ``ppo``: ``-sum(min(r * A, clip(r, lo, hi) * A))``;
* ``cispo``: ``-sum(stop_gradient(clip(r, lo, hi)) * lp * A)``;
* ``dro``: ``-sum(lp * A - beta / 2 * (lp - q)**2)``;
* ``stable_reinforce``: ``-sum(s * (stop_gradient(min(r, 1)) * lp * A
  - kl_coeff * (r - 1 - log r)))``;

where ``lo = clip_low_threshold`` (default 0.8) and ``hi = clip_high_threshold``
(default 1.2), ``beta`` (default 0.05) and ``kl_coeff`` (default 0) come from
``loss_fn_config``. ``dro`` is Tinker's published formula. Tinker does not publish
StableReinforce's objective, only its interface (sampling with
``record_stability_info=True``, datums with provenance, ``kl_coeff``); the service's
``stable_reinforce`` is its own definition on that interface:

* ``q`` is the sampler's logprob *recorded* when the token was sampled (looked up through
  the datum's provenance, see ``jaxreg.service.sampling.StabilityRecords``), and
  ``s`` is 1 on the targets a ``SampledProvenanceSpan`` names, 0 on prompt tokens;
* the policy term is REINFORCE with the importance weight truncated at 1 and held
  constant (V-trace's ``rho_bar = 1``): its gradient, ``min(r, 1) * A * grad lp``, is
  bounded however stale the sample, and equals REINFORCE's on-policy (``r = 1``);
* ``r - 1 - log r`` (>= 0) estimates ``KL(q || p)`` from tokens drawn from ``q``
  without bias, and so does its gradient (``(r - 1) * grad lp``): ``kl_coeff`` pulls the
  learner back toward the sampler that produced the data.

Example (PPO with a tighter clip)::

  training_client.forward_backward(data, "ppo",
                                   {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULTS = {
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
    "stable_reinforce": {"kl_coeff": 0.0},
}


def check_config(loss_fn: str, config: Any, field: str, error: Any) -> dict[str, np.ndarray]:
    """Validates ``loss_fn_config``; returns every option of ``loss_fn`` as float32 scalars.

    Raises ``error(400, message)`` naming the field, the expected and the found value.
    """
    defaults = DEFAULTS.get(loss_fn, {})
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise error(400, f"{field}: expected an object, found {type(config).__name__}")
    if config and not defaults:
        raise error(400, f"{field}: {loss_fn} takes no options, found {dict(config)!r}")
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise error(
            400, f"{field}: unknown options {unknown} for {loss_fn}; expected {sorted(defaults)}"
        )
    values = {**defaults, **config}
    for k, v in values.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise error(400, f"{field}.{k}: expected a finite number >= 0, found {v!r}")
    lo, hi = values.get("clip_low_threshold"), values.get("clip_high_threshold")
    if lo is not None and hi is not None and lo > hi:
        raise error(
            400, f"{field}: clip_low_threshold ({lo}) must not exceed clip_high_threshold ({hi})"
        )
    return {k: np.asarray(v, np.float32) for k, v in values.items()}


def provenance_inputs(records: Any, session: str, data: list, spans: list, error: Any) -> list:
    """``stable_reinforce``'s datums with the sampler's recorded ``logprobs`` and ``sampled``.

    ``records`` is a ``jaxreg.service.sampling.StabilityRecords``, ``spans[i]`` datum
    ``i``'s ``loss_fn_input_spans`` (None without provenance). Raises
    ``error(400, message)`` naming the datum's field.
    """
    out = []
    for i, (d, sp) in enumerate(zip(data, spans, strict=True)):
        where = f"forward_backward_input.data[{i}]"
        if "sampled" in d.loss_fn_inputs:
            raise error(
                400, f"{where}.loss_fn_inputs.sampled: computed from the datum's provenance "
                "on this path; do not send it"
            )  # fmt: skip
        if sp is None:
            raise error(
                400, f"{where}.loss_fn_input_spans: stable_reinforce needs provenance "
                "(sample with record_stability_info=True, then Datum.with_provenance)"
            )  # fmt: skip
        tgt = d.loss_fn_inputs.get("target_tokens")
        if tgt is None:
            raise error(400, f"{where}.loss_fn_inputs.target_tokens: missing")
        try:
            q, sampled = records.resolve(session, sp, tgt, where)
        except ValueError as e:
            raise error(400, str(e)) from None
        if tgt.ndim > 1:  # one value per target, like the other inputs
            q = np.broadcast_to(q[:, None], tgt.shape).copy()
            sampled = np.broadcast_to(sampled[:, None], tgt.shape).copy()
        out.append(d.replace_inputs(logprobs=q, sampled=sampled))
    return out


def policy_loss(loss_fn: str, lp: jax.Array, inputs: Mapping[str, Any], mask: jax.Array):
    """A loss of ``DEFAULTS`` summed over the tokens where ``mask`` is 1 (see the module doc).

    ``stable_reinforce`` also reads ``inputs["sampled"]`` (``s``, 1 on sampled targets).
    """
    adv = inputs["advantages"]
    if loss_fn == "dro":
        dev = jnp.where(mask > 0, lp - inputs["logprobs"], 0.0)
        return -jnp.sum((lp * adv - 0.5 * inputs["beta"] * dev * dev) * mask)
    if loss_fn == "stable_reinforce":
        s = inputs["sampled"] * mask
        log_r = jnp.where(s > 0, lp - inputs["logprobs"], 0.0)
        weight = jax.lax.stop_gradient(jnp.exp(jnp.minimum(log_r, 0.0)))  # min(r, 1)
        kl = inputs["kl_coeff"]
        # With kl_coeff = 0 the penalty is exactly 0, even where r overflows (no 0 * inf).
        log_r_kl = jnp.where(kl > 0, log_r, 0.0)
        penalty = jnp.expm1(log_r_kl) - log_r_kl  # r - 1 - log r, accurate near r = 1
        return -jnp.sum((weight * lp * adv - kl * penalty) * s)
    ratio = jnp.exp(jnp.where(mask > 0, lp - inputs["logprobs"], 0.0))
    clipped = jnp.clip(ratio, inputs["clip_low_threshold"], inputs["clip_high_threshold"])
    if loss_fn == "ppo":
        per_token = jnp.minimum(ratio * adv, clipped * adv)
    elif loss_fn == "cispo":
        per_token = jax.lax.stop_gradient(clipped) * lp * adv
    else:  # pragma: no cover - the engine validates loss_fn first
        raise ValueError(f"policy_loss: unknown loss {loss_fn!r}")
    return -jnp.sum(per_token * mask)

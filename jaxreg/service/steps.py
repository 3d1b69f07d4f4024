"""The compiled training steps and their runs on a model.

``Steps`` jit-compiles ``forward``, ``forward_backward`` (plain, or with the
parameter-space diagnostics of ``jaxreg.service.diagnostics``) and ``optim_step``
(AdamW with traced hyperparameters, so a new learning rate does not recompile), and
runs them on a ``ModelState``'s arrays.

A request whose loss or gradient is not finite fails (``request_failed``) and changes
nothing: the compiled steps accumulate a gradient, or apply an update, only when every
value is finite.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg._src.remote.wire import encode_tensor
from jaxreg.service import diagnostics
from jaxreg.service import lora as lora_lib
from jaxreg.service import losses as service_losses
from jaxreg.service import model as model_lib
from jaxreg.service.errors import ServiceError
from jaxreg.service.model_state import ModelState
from jaxreg.service.validation import Prepared

_DECAY_MASK = lora_lib.decay_mask  # a LoRA model's frozen base gets no weight decay
LOSS_CONFIG = service_losses.DEFAULTS  # loss_fn_config options (ppo, cispo) and defaults


def adamw() -> optax.GradientTransformation:
    """The service's optimizer: AdamW whose hyperparameters are traced (``inject_hyperparams``)."""
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0, mask=_DECAY_MASK
    )


class Steps:
    """The compiled ``forward``, ``forward_backward`` and ``optim_step`` of one model config.

    Args:
      config: the model's ``ModelConfig``.
      optimizer: the optimizer ``optim_step`` applies (``adamw()``).
    """

    def __init__(self, config: model_lib.ModelConfig, optimizer: optax.GradientTransformation):
        self.config = config
        self._traces: collections.Counter[str] = collections.Counter()
        self._optimizer = optimizer
        self._compile()

    def _compile(self) -> None:
        cfg = self.config
        traces = self._traces

        def loss_and_logprobs(params, tokens, targets, mask, inputs, loss_fn):
            lp = model_lib.token_logprobs(cfg, lora_lib.merged(params), tokens, targets)
            m = mask if lp.ndim == 2 else mask[..., None]
            if loss_fn == "cross_entropy":
                loss = -jnp.sum(inputs["weights"] * lp * m)
            elif loss_fn in LOSS_CONFIG:  # ppo, cispo, dro, ...: see jaxreg.service.losses
                loss = service_losses.policy_loss(loss_fn, lp, inputs, m)
            else:
                ratio = jnp.exp(jnp.where(m > 0, lp - inputs["logprobs"], 0.0))
                loss = -jnp.sum(ratio * inputs["advantages"] * m)
            return loss, lp

        @functools.partial(jax.jit, static_argnames="loss_fn")
        def forward(params, tokens, targets, mask, inputs, loss_fn):
            traces["forward"] += 1
            return loss_and_logprobs(params, tokens, targets, mask, inputs, loss_fn)

        @functools.partial(jax.jit, static_argnames="loss_fn", donate_argnames="grad_acc")
        def forward_backward(params, grad_acc, tokens, targets, mask, inputs, loss_fn):
            traces["forward_backward"] += 1
            (loss, lp), grads = jax.value_and_grad(loss_and_logprobs, has_aux=True)(
                params, tokens, targets, mask, inputs, loss_fn
            )
            # Accumulate only a finite gradient (and loss): a non-finite one fails the
            # request and must leave the accumulated gradient exactly as it was.
            grad_ok = _all_finite(grads)
            ok = grad_ok & jnp.isfinite(loss)
            acc = jax.tree.map(lambda a, g: jnp.where(ok, a + g, a), grad_acc, grads)
            return loss, lp, acc, grad_ok

        optimizer = self._optimizer

        @functools.partial(jax.jit, donate_argnames=("params", "opt_state", "grad_acc"))
        def optim_step(params, opt_state, grad_acc, hyper, clip):
            traces["optim_step"] += 1
            # optax mixes the int step count with traced float betas: fine under the
            # standard promotion rules, refused under "strict" (which users may set).
            with jax.numpy_dtype_promotion("standard"):
                return _optim_step(params, opt_state, grad_acc, hyper, clip)

        def _optim_step(params, opt_state, grad_acc, hyper, clip):
            norm = optax.tree.norm(grad_acc)
            scale = jnp.where((clip > 0) & (norm > clip), clip / norm, 1.0)
            grads = jax.tree.map(lambda g: g * scale, grad_acc)
            old_state = opt_state
            opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **hyper})
            updates, new_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            # An update that overflows (e.g. a huge learning rate) is not applied: the
            # step fails and the model, its optimizer state and gradient stay as they were.
            ok = jnp.isfinite(norm) & _all_finite(new_params) & _all_finite(new_state)
            keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
            zeros = jax.tree.map(jnp.zeros_like, grad_acc)
            return (
                keep(new_params, params),
                keep(new_state, old_state),
                keep(zeros, grad_acc),
                norm,
                ok,
            )

        self._forward, self._forward_backward, self._optim_step = (
            forward,
            forward_backward,
            optim_step,
        )
        self._forward_backward_diag = diagnostics.make_step(cfg, traces)

    def trace_counts(self) -> dict[str, int]:
        """How many times each compiled step was traced (for no-recompile checks)."""
        return dict(self._traces)

    def run_forward_backward(self, m: ModelState, p: Prepared) -> dict[str, Any]:
        start = time.perf_counter()
        if p.forward_only:
            loss, lp = self._forward(m.params, p.tokens, p.targets, p.mask, p.inputs, p.loss_fn)
        else:
            loss, lp, m.grad_acc, grad_ok = self._forward_backward(
                m.params, m.grad_acc, p.tokens, p.targets, p.mask, p.inputs, p.loss_fn
            )
            if not bool(grad_ok):
                raise ServiceError(
                    422,
                    "forward_backward: the gradient is not finite (loss "
                    f"{float(loss)}); nothing was accumulated, the model is unchanged. "
                    "Check the weights/advantages for huge values",
                )
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise ServiceError(
                422,
                f"{'forward' if p.forward_only else 'forward_backward'}: the loss is not "
                f"finite ({loss_value}); nothing was accumulated, the model is unchanged. "
                "Check the weights/advantages/logprobs for huge values",
            )
        if not p.forward_only:
            m.n_accumulated += 1
        lp = np.asarray(lp)
        compute = time.perf_counter() - start
        start = time.perf_counter()
        outputs = [
            {"logprobs": encode_tensor(lp[i, :n], p.encoding)} for i, n in enumerate(p.lengths)
        ]
        metrics = {"loss:sum": loss_value, "tokens:sum": float(sum(p.lengths))}
        return {
            "type": "forward" if p.forward_only else "forward_backward",
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": outputs,
            "metrics": metrics,
            "timing": {
                "decode_s": p.decode_s,
                "compute_s": compute,
                "encode_s": time.perf_counter() - start,
            },
        }

    def run_param_diagnostics(self, m: ModelState, p: Prepared, diag) -> dict[str, Any]:
        """``forward_backward`` that also measures each term's parameter gradient."""
        start = time.perf_counter()
        loss, lp, m.grad_acc, gram, total, ok = self._forward_backward_diag(
            m.params,
            m.grad_acc,
            p.tokens,
            p.targets,
            p.mask,
            p.inputs["weights"],
            diag.term_weights,
            diag.loss_weights,
            np.int32(len(diag.term_names)),
        )
        if not bool(ok):
            raise ServiceError(
                422,
                "forward_backward: the loss, a term's gradient or their Gramian is not "
                f"finite (loss {float(loss)}); nothing was accumulated, the model is "
                "unchanged. Check the weights for huge values",
            )
        m.n_accumulated += 1
        lp, gram, total = jax.device_get((lp, gram, total))
        compute = time.perf_counter() - start
        start = time.perf_counter()
        outputs = [
            {"logprobs": encode_tensor(lp[i, :n], p.encoding)} for i, n in enumerate(p.lengths)
        ]
        return {
            "type": "forward_backward",
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": outputs,
            "metrics": {"loss:sum": float(loss), "tokens:sum": float(sum(p.lengths))},
            diagnostics.FIELD: diagnostics.result_field(diag, gram, total),
            "timing": {
                "decode_s": p.decode_s,
                "compute_s": compute,
                "encode_s": time.perf_counter() - start,
            },
        }

    def run_optim(self, m: ModelState, hyper, clip) -> dict[str, Any]:
        m.params, m.opt_state, m.grad_acc, norm, ok = self._optim_step(
            m.params, m.opt_state, m.grad_acc, hyper, clip
        )
        if not bool(ok):
            raise ServiceError(
                422,
                f"optim_step: the update is not finite (gradient norm {float(norm)}); it "
                "was not applied and the model, its optimizer state and accumulated "
                "gradient are unchanged. Lower the learning rate",
            )
        n, m.n_accumulated = m.n_accumulated, 0
        m.step += 1
        return {
            "type": "optim_step",
            "metrics": {"grad_norm": float(norm), "step": m.step, "accumulated": n},
        }


def _all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every array of ``tree`` is finite (one traced bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


__all__ = ["Steps", "adamw"]

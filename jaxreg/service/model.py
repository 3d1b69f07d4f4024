"""A small decoder-only transformer in plain JAX: the reference service's model.

Pre-LayerNorm blocks, causal multi-head attention with sinusoidal positions (so the
context length costs no parameters), a GELU MLP and an output projection tied to the
token embedding. With the defaults it has about 400k parameters and runs a training
step on a CPU in milliseconds at demo sizes.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxreg.service import model
  >>> cfg = model.ModelConfig(d_model=16, n_layers=1, n_heads=2)   # the service's: defaults
  >>> params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
  >>> logprobs = jax.jit(lambda p, tokens, targets: model.token_logprobs(cfg, p, tokens, targets))
  >>> tokens = jnp.array([[1, 14, 5, 6]])
  >>> logprobs(params, tokens, jnp.array([[14, 5, 6, 3]])).shape   # [B, T]
  (1, 4)
  >>> logprobs(params, tokens, jnp.zeros((1, 4, 3), int)).shape    # [B, T, K]: K = 3 targets
  (1, 4, 3)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the reference model.

    Attributes:
      vocab_size: number of token ids (see ``jaxreg.service.tasks``).
      d_model: width of the residual stream.
      n_layers: number of transformer blocks.
      n_heads: attention heads per block (``d_model`` must be divisible by it).
      context_length: the longest sequence the service accepts.
    """

    vocab_size: int = 32
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context_length: int = 1024

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "context_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field}: expected a positive int, found {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Initialises parameters (GPT-2 style: N(0, 0.02), residual projections scaled)."""
    d = cfg.d_model
    keys = iter(jax.random.split(key, 1 + 4 * cfg.n_layers))
    std = 0.02
    resid_std = std / math.sqrt(2 * cfg.n_layers)

    def normal(shape, s):
        return s * jax.random.normal(next(keys), shape, jnp.float32)

    def ln():
        return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}

    layers = []
    for _ in range(cfg.n_layers):
        layers.append(
            {
                "ln1": ln(),
                "qkv": normal((d, 3 * d), std),
                "proj": normal((d, d), resid_std),
                "ln2": ln(),
                "mlp_in": normal((d, 4 * d), std),
                "mlp_in_bias": jnp.zeros((4 * d,), jnp.float32),
                "mlp_out": normal((4 * d, d), resid_std),
            }
        )
    return {"embed": normal((cfg.vocab_size, d), std), "layers": layers, "ln_f": ln()}


def num_params(params: Params) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _positions(length: int, d: int) -> jax.Array:
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = pos * freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def logits(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Next-token logits ``[B, T, V]`` for int tokens ``[B, T]`` (causal)."""
    _, t = tokens.shape
    h = params["embed"][tokens] * math.sqrt(cfg.d_model) + _positions(t, cfg.d_model)
    heads, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    causal = jnp.tril(jnp.ones((t, t), bool))
    for layer in params["layers"]:
        q, k, v = jnp.split(_layer_norm(layer["ln1"], h) @ layer["qkv"], 3, axis=-1)
        q, k, v = (a.reshape(*a.shape[:2], heads, hd) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        h = h + attn.reshape(h.shape) @ layer["proj"]
        m = _layer_norm(layer["ln2"], h) @ layer["mlp_in"] + layer["mlp_in_bias"]
        h = h + jax.nn.gelu(m) @ layer["mlp_out"]
    return _layer_norm(params["ln_f"], h) @ params["embed"].T


def token_logprobs(
    cfg: ModelConfig, params: Params, tokens: jax.Array, targets: jax.Array
) -> jax.Array:
    """``log p(targets[b, t] | tokens[b, :t+1])``: ``[B, T]``, or ``[B, T, K]`` for K targets."""
    logp = jax.nn.log_softmax(logits(cfg, params, tokens), axis=-1)
    if targets.ndim == 2:
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.take_along_axis(logp, targets, axis=-1)

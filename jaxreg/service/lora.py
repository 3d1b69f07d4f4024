"""LoRA adapters on the reference transformer (what ``create_lora_training_client`` trains).

A LoRA model's parameter tree is ``{"base": <frozen base params>, "lora": {path: {"a",
"b"}}}``. Each adapted matrix ``W`` (``m x n``) is used as

.. math:: W' = \\mathrm{sg}(W) + \\tfrac{\\alpha}{r} A B, \\quad A \\in \\mathbb{R}^{m \\times r},
          B \\in \\mathbb{R}^{r \\times n}

with ``A ~ N(0, 1/m)``, ``B = 0`` (so a new model starts exactly at the base) and
``alpha = r`` (scale 1). The base gets no gradient (``stop_gradient``) and no weight
decay (``decay_mask``), so an optimizer step moves only the adapters, and every
update to ``W'`` has rank at most ``r``. Which matrices are adapted follows
``lora_config``: ``train_attn`` (``qkv``, ``proj``), ``train_mlp`` (``mlp_in``,
``mlp_out``) and ``train_unembed`` (the output projection, which this model ties to
the token embedding).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxreg.service import lora, model
  >>> cfg = model.ModelConfig(d_model=16, n_layers=1, n_heads=2)
  >>> base = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
  >>> params = lora.init(base, {"rank": 2, "seed": 0})
  >>> sorted(params["lora"])                      # the adapted matrices
  ['embed', 'layers.0.mlp_in', 'layers.0.mlp_out', 'layers.0.proj', 'layers.0.qkv']
  >>> w = lora.merged(params)["layers"][0]["qkv"]  # W' = sg(W) + A B, with B = 0 at first
  >>> bool(jnp.array_equal(w, base["layers"][0]["qkv"]))
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ATTN = ("qkv", "proj")
MLP = ("mlp_in", "mlp_out")


def is_lora(params: Any) -> bool:
    """Whether ``params`` is a LoRA tree (``{"base", "lora"}``)."""
    return isinstance(params, Mapping) and set(params) == {"base", "lora"}


def _targets(base: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    names = []
    if config.get("train_unembed", True):
        names.append("embed")
    for i in range(len(base["layers"])):
        if config.get("train_attn", True):
            names += [f"layers.{i}.{k}" for k in ATTN]
        if config.get("train_mlp", True):
            names += [f"layers.{i}.{k}" for k in MLP]
    return names


def _get(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def init(base: Any, config: Mapping[str, Any]) -> Any:
    """A LoRA tree over ``base`` with rank ``config["rank"]`` (``B = 0``: starts at base)."""
    rank = int(config["rank"])
    seed = config.get("seed")
    key = jax.random.key(0 if seed is None else int(seed))
    lora = {}
    for i, path in enumerate(_targets(base, config)):
        w = _get(base, path)
        m, n = w.shape
        a = jax.random.normal(jax.random.fold_in(key, i), (m, rank), jnp.float32) / np.sqrt(m)
        lora[path] = {"a": a, "b": jnp.zeros((rank, n), jnp.float32)}
    return {"base": jax.tree.map(jnp.asarray, base), "lora": lora}


def merged(params: Any) -> Any:
    """The plain parameter tree the model runs on (``params`` itself when not LoRA)."""
    if not is_lora(params):
        return params
    base = jax.tree.map(jax.lax.stop_gradient, params["base"])
    out = {
        "embed": base["embed"],
        "ln_f": base["ln_f"],
        "layers": [dict(layer) for layer in base["layers"]],
    }
    for path, ab in params["lora"].items():
        delta = ab["a"] @ ab["b"]
        if path == "embed":
            out["embed"] = out["embed"] + delta
        else:
            _, i, name = path.split(".")
            out["layers"][int(i)][name] = out["layers"][int(i)][name] + delta
    return out


def decay_mask(params: Any) -> Any:
    """Weight decay applies to the trained leaves only (not to a LoRA model's base)."""
    if not is_lora(params):
        return jax.tree.map(lambda _: True, params)
    return {
        "base": jax.tree.map(lambda _: False, params["base"]),
        "lora": jax.tree.map(lambda _: True, params["lora"]),
    }


def num_trainable(params: Any) -> int:
    """Number of trained scalars (the adapters for a LoRA tree)."""
    tree = params["lora"] if is_lora(params) else params
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

"""The base checkpoint: built deterministically from a seed, stored as an ``.npz`` file.

``python -m jaxreg build-checkpoint`` (or ``build_base_checkpoint``) trains the
reference model on the copy and reverse tasks of ``jaxreg.service.tasks`` with
optax Adam and writes ``jaxreg/service/data/base.npz``, which ships with the package.
When that file is missing, ``load_base_checkpoint`` builds it on first use.

Files are written atomically (a temporary file in the same directory, then
``os.replace``), so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg.service import model as model_lib
from jaxreg.service import tasks

BASE_PATH = Path(__file__).parent / "data" / "base.npz"
BASE_SEED = 0
BASE_STEPS = 3000
BASE_TASKS = ("C", "R")


def save_tree(path: str | os.PathLike, tree: Any, meta: dict | None = None) -> Path:
    """Writes a pytree of arrays (and a JSON-able ``meta``) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree.leaves(tree)
    header = {"treedef": _treedef_to_json(tree), "meta": meta or {}, "n": len(leaves)}
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds vs allow_pickle
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that interrupted ``save_tree`` calls left behind.

    They are named ``.<name>.npz.<random>.tmp``; call this only while no save is running
    in ``directory`` (the service does at start). Returns the paths removed.
    """
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for tmp in directory.glob(".*.npz.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def load_tree(path: str | os.PathLike, like: Any = None) -> tuple[Any, dict]:
    """Reads a pytree written by ``save_tree``; returns ``(tree, meta)``.

    With ``like``, the leaves are put into ``like``'s structure (for optimizer states
    made of named tuples), after checking that every leaf's shape and dtype match.
    """
    with np.load(Path(path), allow_pickle=False) as f:
        header = json.loads(bytes(f["__header__"]).decode())
        leaves = [f[f"leaf_{i:05d}"] for i in range(header["n"])]
    if like is None:
        return _treedef_from_json(header["treedef"], iter(leaves)), header["meta"]
    expected, treedef = jax.tree.flatten(like)
    if len(expected) != len(leaves):
        raise ValueError(
            f"{path}: expected {len(expected)} arrays for this structure, found {len(leaves)}"
        )
    for i, (e, f) in enumerate(zip(expected, leaves, strict=True)):
        if tuple(np.shape(e)) != f.shape or np.asarray(e).dtype != f.dtype:
            raise ValueError(
                f"{path}: array {i}: expected {np.asarray(e).dtype}{list(np.shape(e))}, "
                f"found {f.dtype}{list(f.shape)}"
            )
    return jax.tree.unflatten(treedef, leaves), header["meta"]


def _treedef_to_json(tree: Any) -> Any:
    """A JSON description of nested dicts/lists/tuples of arrays (what checkpoints hold)."""
    if isinstance(tree, dict):
        return {"dict": {k: _treedef_to_json(v) for k, v in sorted(tree.items())}}
    if isinstance(tree, list | tuple):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_treedef_to_json(v) for v in tree]}
    return None


def _treedef_from_json(desc: Any, leaves) -> Any:
    if desc is None:
        return next(leaves)
    if "dict" in desc:
        return {k: _treedef_from_json(v, leaves) for k, v in desc["dict"].items()}
    items = [_treedef_from_json(v, leaves) for v in desc.get("list", desc.get("tuple"))]
    return items if "list" in desc else tuple(items)


def _train_loss(cfg, params, tokens, targets, mask):
    lp = model_lib.token_logprobs(cfg, params, tokens, targets)
    return -(lp * mask).sum() / mask.sum()


def build_base_checkpoint(
    path: str | os.PathLike = BASE_PATH,
    *,
    seed: int = BASE_SEED,
    steps: int = BASE_STEPS,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    cfg: model_lib.ModelConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Trains the base model on copy + reverse from ``seed`` and writes it to ``path``.

    Deterministic for a given seed on a given platform. Takes about a minute on two
    CPU cores with the defaults. ``progress(step, loss)`` is called every 100 steps.
    """
    cfg = cfg or model_lib.ModelConfig()
    params = model_lib.init_params(cfg, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, 100, steps, 1e-4)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, tokens, targets, mask):
        loss, grads = jax.value_and_grad(lambda p: _train_loss(cfg, p, tokens, targets, mask))(
            params
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    per_task = batch_size // len(BASE_TASKS)
    start = time.perf_counter()
    for i in range(steps):
        examples = [
            e for t in BASE_TASKS for e in tasks.make_examples(t, per_task, seed=seed * 100003 + i)
        ]
        tok, tgt, mask, _ = tasks.pad_examples(examples, length=20)
        params, opt_state, loss = step(params, opt_state, tok, tgt, mask)
        if progress is not None and (i % 100 == 0 or i == steps - 1):
            progress(i, float(loss))
    meta = {
        "config": cfg.to_dict(),
        "seed": seed,
        "steps": steps,
        "tasks": list(BASE_TASKS),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return save_tree(path, params, meta)


def load_base_checkpoint(
    path: str | os.PathLike = BASE_PATH,
) -> tuple[model_lib.ModelConfig, model_lib.Params]:
    """Returns ``(config, params)`` of the base model, building it first if missing."""
    path = Path(path)
    if not path.exists():
        build_base_checkpoint(path)
    params, meta = load_tree(path)
    params = jax.tree.map(jnp.asarray, params)
    return model_lib.ModelConfig(**meta["config"]), params

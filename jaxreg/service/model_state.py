"""``ModelState``: one model the service holds and trains.

Its arrays (parameters, optimizer state, accumulated gradient), its step counters and
the ``Sequencer`` that orders its requests by ``seq_id`` (``jaxreg.service.ordering``).
The engine (``jaxreg.service.engine``) keeps them by model id; the compiled steps
(``jaxreg.service.steps``) replace its arrays.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxreg.service import checkpoint
from jaxreg.service.errors import ServiceError
from jaxreg.service.ordering import Sequencer


@dataclasses.dataclass
class ModelState:
    """A model the service holds: its arrays, counters and request order."""

    model_id: str
    params: Any
    opt_state: Any
    grad_acc: Any
    seq: Sequencer
    n_accumulated: int = 0
    step: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    in_flight: int = 0  # released to the scheduler, not finished
    deleted: bool = False

    def state_tree(self) -> dict[str, Any]:
        """What a checkpoint holds of the model's arrays (both front doors save this)."""
        return {"params": self.params, "opt_state": self.opt_state, "grad_acc": self.grad_acc}

    def read_state(self, file: Path, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A saved ``state_tree`` shaped like this model's (device arrays) and its
        metadata; ``ServiceError`` 400 naming ``what`` when it does not fit."""
        try:
            tree, meta = checkpoint.load_tree(file, like=self.state_tree())
        except ValueError as e:
            raise ServiceError(400, f"path: {what} does not fit this model: {e}") from None
        return jax.tree.map(jnp.asarray, tree), meta


__all__ = ["ModelState"]

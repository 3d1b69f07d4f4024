"""Named model states of jaxreg's JSON API (``save_state`` / ``load_state``).

A state is the model's arrays and counters in ``<state_dir>/<name>.npz``
(``jaxreg.service.checkpoint``'s format), named ``jaxreg://<name>`` in requests. The
tinker SDK's ``tinker://`` checkpoints are ``jaxreg.service.tinker_checkpoints``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jaxreg.service import checkpoint
from jaxreg.service.errors import ServiceError
from jaxreg.service.model import ModelConfig
from jaxreg.service.model_state import ModelState

STATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used with fullmatch


class StateStore:
    """Saves and loads model states under ``state_dir``."""

    def __init__(self, state_dir: Path, config: ModelConfig):
        self.state_dir = state_dir
        self.config = config

    def path(self, name: str) -> Path:
        return self.state_dir / f"{name}.npz"

    def save(self, m: ModelState, name: str) -> dict[str, Any]:
        tree = m.state_tree()
        meta = {"step": m.step, "n_accumulated": m.n_accumulated, "config": self.config.to_dict()}
        checkpoint.save_tree(self.path(name), tree, meta)
        return {"type": "save_state", "path": f"jaxreg://{name}", "step": m.step}

    def load(self, m: ModelState, name: str) -> dict[str, Any]:
        path = self.path(name)
        if not path.exists():
            raise ServiceError(404, f"path: no saved state named {name!r}")
        tree, meta = m.read_state(path, f"state {name!r}")
        m.params, m.opt_state, m.grad_acc = tree["params"], tree["opt_state"], tree["grad_acc"]
        m.step, m.n_accumulated = meta["step"], meta["n_accumulated"]
        return {"type": "load_state", "path": f"jaxreg://{name}", "step": m.step}


__all__ = ["STATE_NAME", "StateStore"]

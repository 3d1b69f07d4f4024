"""The tinker SDK's checkpoints: ``save_weights``, ``load_weights``, ``weights_info``.

``save_weights`` writes ``tinker://{model_id}/weights/{name}`` (the model's arrays,
optimizer state and LoRA config) under ``<state_dir>/tinker/``; ``load_weights`` loads
one into a model, or creates a model from it; ``save_weights_for_sampler`` keeps the
merged parameters for sampling (named, or as a sampling session). The ``RestClient``'s
listing and deleting of these files is ``jaxreg.service.tinker_rest``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxreg.service import checkpoint
from jaxreg.service import lora as lora_lib
from jaxreg.service.engine import BASE_MODEL
from jaxreg.service.errors import ServiceError
from jaxreg.service.tinker_base import TinkerBase
from jaxreg.service.tinker_base import nonempty_str as _str
from jaxreg.service.tinker_base import nonneg_int as _nonneg_int


class TinkerCheckpoints(TinkerBase):
    """The checkpoint handlers."""

    async def save_weights(self, body):
        m = self.engine._model(body.get("model_id"))
        name = self._name(body)
        path = f"tinker://{m.model_id}/weights/{name}"
        file = self._file(m.model_id, "weights", name)
        if file.exists() and not body.get("overwrite", False):
            # 400, not 409: the SDK retries a 409 for minutes whatever x-should-retry says.
            raise ServiceError(
                400, f"path: a checkpoint named {name!r} already exists ({path!r}); "
                "save under another name"
            )  # fmt: skip
        info = self._model_info(m.model_id)

        def job():
            tree = m.state_tree()
            meta = {
                "step": m.step,
                "n_accumulated": m.n_accumulated,
                "config": self.engine.config.to_dict(),
                "base_model": info["base_model"],
                "lora": info["lora"],
            }
            checkpoint.save_tree(file, tree, meta)
            return {"type": "save_weights", "path": path}

        rid = await asyncio.to_thread(self.engine.submit_job, m.model_id, body.get("seq_id"), job)
        return {"request_id": rid, "model_id": m.model_id}

    def _load_job(self, m, file: Path, path: str, optimizer: bool):
        def job():
            tree, meta = m.read_state(file, repr(path))
            m.params = tree["params"]
            if optimizer:
                m.opt_state, m.grad_acc = tree["opt_state"], tree["grad_acc"]
                m.step, m.n_accumulated = meta["step"], meta["n_accumulated"]
            else:
                m.opt_state = self.engine._optimizer.init(m.params)
                m.grad_acc = jax.tree.map(jnp.zeros_like, m.params)
                m.n_accumulated = 0
            return {"type": "load_weights", "path": path, "model_id": m.model_id}

        return job

    async def load_weights(self, body):
        path = body.get("path")
        run, kind, name = self._parse_path(path)
        if kind != "weights":
            raise ServiceError(400, f"path: {path!r} holds sampler weights; load a 'weights' path")
        file = self._file(run, kind, name)
        if not file.exists():
            raise ServiceError(404, f"path: no checkpoint at {path!r}")
        optimizer = bool(body.get("optimizer", False))
        if body.get("session_id") is not None:  # a new model from the checkpoint: seq_id 0
            sid = _str(body, "session_id")
            self._session(sid)
            seq = _nonneg_int(body.get("model_seq_id"), "model_seq_id")
            self._check_base(body.get("base_model"))
            if not optimizer:
                self._check_optimizer(body.get("optimizer_config"), "optimizer_config")
            _, meta = checkpoint.load_tree(file)
            model_id = f"{sid}:train:{seq}"
            with self._lock:
                self.models.setdefault(
                    model_id, {"lora": meta.get("lora", {"rank": 0}), "base_model": BASE_MODEL}
                )
            lora = self.models[model_id]["lora"]
            params = lora_lib.init(self.engine._base_params, lora) if lora.get("rank") else None
            m = self.engine.add_model(model_id, first_seq=0, params=params)
            job = self._load_job(m, file, path, optimizer)
            rid = await asyncio.to_thread(self.engine.submit_job, model_id, 0, job)
            return {"request_id": rid, "model_id": model_id}
        m = self.engine._model(body.get("model_id"))
        job = self._load_job(m, file, path, optimizer)
        rid = await asyncio.to_thread(self.engine.submit_job, m.model_id, body.get("seq_id"), job)
        return {"request_id": rid, "model_id": m.model_id}

    async def weights_info(self, body):
        run, kind, name = self._parse_path(body.get("tinker_path"), "tinker_path")
        file = self._file(run, kind, name)
        if not file.exists():
            raise ServiceError(404, f"tinker_path: no checkpoint at {body.get('tinker_path')!r}")
        _, meta = checkpoint.load_tree(file)
        lora = meta.get("lora") or {"rank": 0}
        return {
            "base_model": meta.get("base_model", BASE_MODEL),
            "is_lora": bool(lora.get("rank")),
            "lora_rank": lora.get("rank") or None,
            "train_mlp": lora.get("train_mlp"),
            "train_attn": lora.get("train_attn"),
            "train_unembed": lora.get("train_unembed"),
        }

    async def save_weights_for_sampler(self, body):
        m = self.engine._model(body.get("model_id"))
        named = body.get("path") is not None
        if named:
            name = self._name(body)
            path = f"tinker://{m.model_id}/sampler_weights/{name}"
            file = self._file(m.model_id, "sampler_weights", name)
        else:
            seq = _nonneg_int(body.get("sampling_session_seq_id"), "sampling_session_seq_id")
            session = m.model_id.split(":train:")[0]
            sampler_id = f"{session}:sample:{seq}"

        def job():
            # merged: the sampler runs the plain model; a copy: optim_step donates m.params
            params = jax.tree.map(jnp.copy, lora_lib.merged(m.params))
            if named:
                checkpoint.save_tree(file, {"params": params}, {"base_model": BASE_MODEL})
                with self._lock:
                    self._sampler_params[path] = params
                return {"type": "save_weights_for_sampler", "path": path}
            with self._lock:
                self.samplers[sampler_id] = {"params": params, "model_path": None}
            return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}

        rid = await asyncio.to_thread(self.engine.submit_job, m.model_id, body.get("seq_id"), job)
        return {"request_id": rid, "model_id": m.model_id}


__all__ = ["TinkerCheckpoints"]

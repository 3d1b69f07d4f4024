"""The tinker SDK's ``RestClient`` checkpoint calls over the front door's state dir.

Paths (SDK 0.38): ``GET training_runs`` (``limit``, ``offset``), ``GET
training_runs/{id}``, ``GET training_runs/{id}/checkpoints``, ``DELETE
training_runs/{id}/checkpoints/{kind}/{name}`` (``kind``: ``weights`` or
``sampler_weights``, the SDK's ``checkpoint_id``). A training run is a model the
front door created or loaded; its checkpoints are the files under
``<state_dir>/tinker/<model_id>/``. The cookbook's ``CheckpointManager`` deletes old
saves with the last call and looks a run up with the second on resume.
"""

from __future__ import annotations

import datetime
import urllib.parse
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxreg.service.engine import BASE_MODEL
from jaxreg.service.errors import ServiceError

_KINDS = {"weights": "training", "sampler_weights": "sampler"}


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


class TinkerREST:
    """``RestClient``'s training-run and checkpoint endpoints over a ``TinkerAPI``."""

    def __init__(self, api: Any):
        self.api = api

    def _run_ids(self) -> list[str]:
        ids = set(self.api.models)
        if self.api.root.exists():
            ids |= {urllib.parse.unquote(p.name) for p in self.api.root.iterdir() if p.is_dir()}
        return sorted(ids)

    def _checkpoints(self, run: str) -> list[dict[str, Any]]:
        out = []
        base = self.api.root / urllib.parse.quote(run, safe="")
        for kind, ctype in _KINDS.items():
            folder = base / kind
            if not folder.is_dir():
                continue
            for f in sorted(folder.glob("*.npz")):
                st = f.stat()
                out.append({
                    "checkpoint_id": f"{kind}/{f.stem}",
                    "checkpoint_type": ctype,
                    "time": _iso(st.st_mtime),
                    "tinker_path": f"tinker://{run}/{kind}/{f.stem}",
                    "size_bytes": st.st_size,
                    "public": False,
                })  # fmt: skip
        out.sort(key=lambda c: c["time"])
        return out

    def _run(self, run: str) -> dict[str, Any]:
        if run not in self._run_ids():
            raise ServiceError(404, f"training_run_id: unknown training run {run!r}")
        info = self.api.models.get(run) or {"lora": {"rank": 0}}
        rank = (info.get("lora") or {}).get("rank", 0)
        cks = self._checkpoints(run)
        last = [c for c in cks if c["checkpoint_type"] == "training"]
        last_s = [c for c in cks if c["checkpoint_type"] == "sampler"]
        times = [c["time"] for c in cks]
        return {
            "training_run_id": run,
            "base_model": info.get("base_model", BASE_MODEL),
            "model_owner": "local",
            "is_lora": bool(rank),
            "lora_rank": rank or None,
            "corrupted": False,
            "last_request_time": max(times) if times else _iso(0.0),
            "last_checkpoint": last[-1] if last else None,
            "last_sampler_checkpoint": last_s[-1] if last_s else None,
        }

    async def list_runs(self, request: Request):
        q = request.query_params
        try:
            limit, offset = int(q.get("limit", 20)), int(q.get("offset", 0))
        except ValueError:
            raise ServiceError(400, "limit/offset: expected integers") from None
        if limit < 0 or offset < 0:
            raise ServiceError(400, f"limit/offset: expected >= 0, found {limit}, {offset}")
        ids = self._run_ids()
        runs = [self._run(r) for r in ids[offset : offset + limit]]
        return {
            "training_runs": runs,
            "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)},
        }

    async def get_run(self, request: Request):
        return self._run(request.path_params["run"])

    async def list_checkpoints(self, request: Request):
        run = request.path_params["run"]
        self._run(run)
        return {"checkpoints": self._checkpoints(run)}

    async def delete_checkpoint(self, request: Request):
        run, ckpt = request.path_params["run"], request.path_params["checkpoint_id"]
        kind, _, name = ckpt.partition("/")
        if kind not in _KINDS or not name:
            raise ServiceError(
                400, "checkpoint_id: expected 'weights/<name>' or 'sampler_weights/<name>', "
                f"found {ckpt!r}"
            )  # fmt: skip
        path = f"tinker://{run}/{kind}/{name}"
        self.api._parse_path(path, "checkpoint_id")
        file = self.api._file(run, kind, name)
        if not file.exists():
            raise ServiceError(404, f"checkpoint_id: no checkpoint at {path!r}")
        file.unlink()
        with self.api._lock:
            self.api._sampler_params.pop(path, None)
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        e = self.api.endpoint
        base = "/api/v1/training_runs"
        return [
            Route(base, e(self.list_runs, raw=True), methods=["GET"]),
            Route(f"{base}/{{run}}", e(self.get_run, raw=True), methods=["GET"]),
            Route(
                f"{base}/{{run}}/checkpoints", e(self.list_checkpoints, raw=True), methods=["GET"]
            ),
            Route(
                f"{base}/{{run}}/checkpoints/{{checkpoint_id:path}}",
                e(self.delete_checkpoint, raw=True),
                methods=["DELETE"],
            ),
        ]


__all__ = ["TinkerREST"]

"""The tinker SDK's sampling: ``create_sampling_session``, ``asample``, ``GET samplers/{id}``.

A sampling session holds fixed parameters (the base model's, or saved sampler
weights); ``asample`` validates the prompt and sampling parameters and queues the
sampling (``jaxreg.service.sampling``) on its own worker thread, deduplicated on the
session's ``seq_id``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from starlette.requests import Request

from jaxreg.service import checkpoint, tasks
from jaxreg.service import lora as lora_lib
from jaxreg.service.engine import BASE_MODEL
from jaxreg.service.errors import ServiceError
from jaxreg.service.tinker_base import TinkerBase
from jaxreg.service.tinker_base import nonempty_str as _str
from jaxreg.service.tinker_base import nonneg_int as _nonneg_int


class Worker:
    """A daemon thread running jobs in order (the sampler's; never blocks interpreter exit)."""

    def __init__(self, name: str):
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            job, fut = self._queue.get()
            try:
                fut.set_result(job())
            except ServiceError as e:
                fut.set_result({"type": "request_failed", "error": e.message, "category": "user"})
            except Exception as e:  # a bug or resource failure: report it, keep serving
                fut.set_result(
                    {"type": "request_failed", "error": f"{type(e).__name__}: {e}",
                     "category": "server"}
                )  # fmt: skip

    def submit(self, job: Callable[[], dict]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((job, fut))
        return fut


class TinkerSampling(TinkerBase):
    """The sampling handlers."""

    def _sampler_weights(self, path: str) -> Any:
        with self._lock:
            if path in self._sampler_params:
                return self._sampler_params[path]
        run, kind, name = self._parse_path(path, "model_path")
        file = self._file(run, kind, name)
        if not file.exists():
            raise ServiceError(404, f"model_path: no weights at {path!r}")
        tree, _ = checkpoint.load_tree(file)  # params: the same nested dicts and lists
        params = jax.tree.map(jnp.asarray, lora_lib.merged(tree["params"]))
        with self._lock:
            self._sampler_params[path] = params
        return params

    async def create_sampling_session(self, body):
        sid = _str(body, "session_id")
        self._session(sid)
        seq = _nonneg_int(body.get("sampling_session_seq_id"), "sampling_session_seq_id")
        sampler_id = f"{sid}:sample:{seq}"
        path = body.get("model_path")
        if path is None:
            self._check_base(_str(body, "base_model"))
            params = self.engine._base_params
        else:
            params = await asyncio.to_thread(self._sampler_weights, path)
        with self._lock:
            self.samplers.setdefault(sampler_id, {"params": params, "model_path": path})
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    async def get_sampler(self, request: Request):
        sampler_id = request.path_params["sampler_id"]
        s = self.samplers.get(sampler_id)
        if s is None:
            raise ServiceError(404, f"sampler_id: unknown sampling session {sampler_id!r}")
        return {"sampler_id": sampler_id, "base_model": BASE_MODEL, "model_path": s["model_path"]}

    def _stops(self, stop: Any) -> list[list[int]]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list):
            raise ServiceError(
                400, f"sampling_params.stop: expected strings or token ids, found {stop!r}"
            )
        out = []
        for s in stop:
            if isinstance(s, str):
                try:
                    out.append(tasks.encode(s))
                except ValueError as e:
                    raise ServiceError(400, f"sampling_params.stop: {e}") from None
            elif isinstance(s, int) and not isinstance(s, bool):
                out.append([s])
            else:
                raise ServiceError(
                    400, f"sampling_params.stop: expected a string or int, found {s!r}"
                )
        return out

    async def asample(self, body):
        sampler_id = body.get("sampling_session_id")
        s = self.samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if s is None:
            if body.get("model_path") or body.get("base_model"):
                raise ServiceError(
                    400, "sampling_session_id: the reference service samples through sampling "
                    "sessions (create_sampling_session) only"
                )  # fmt: skip
            raise ServiceError(404, f"sampling_session_id: unknown sampling session {sampler_id!r}")
        seq = _nonneg_int(body.get("seq_id"), "seq_id")
        with self._lock:
            rid = self._sample_seq.get((sampler_id, seq))
        n = body.get("num_samples", 1)
        if rid is not None:
            return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(n)]}
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 256:
            raise ServiceError(400, f"num_samples: expected an int in [1, 256], found {n!r}")
        tokens: list[int] = []
        prompt = body.get("prompt") or {}
        for j, chunk in enumerate(prompt.get("chunks", []) if isinstance(prompt, Mapping) else []):
            if (
                not isinstance(chunk, Mapping)
                or chunk.get("type", "encoded_text") != "encoded_text"
            ):
                raise ServiceError(
                    400, f"prompt.chunks[{j}]: only 'encoded_text' chunks are supported"
                )
            toks = chunk.get("tokens")
            if not isinstance(toks, list) or not all(type(t) is int for t in toks):
                raise ServiceError(400, f"prompt.chunks[{j}].tokens: expected a list of ints")
            tokens.extend(toks)
        vocab, ctx = self.engine.config.vocab_size, self.engine.config.context_length
        if not tokens:
            raise ServiceError(400, "prompt: expected at least one token")
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ServiceError(
                400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        sp = body.get("sampling_params") or {}
        max_tokens = sp.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ServiceError(
                400, f"sampling_params.max_tokens: expected an int >= 1, found {max_tokens!r}"
            )
        if len(tokens) + max_tokens > ctx:
            raise ServiceError(
                400, f"sampling_params.max_tokens: prompt ({len(tokens)}) + max_tokens "
                f"({max_tokens}) exceeds the context length {ctx}"
            )  # fmt: skip
        temperature = sp.get("temperature", 1.0)
        if (
            not isinstance(temperature, int | float)
            or isinstance(temperature, bool)
            or not (0 <= temperature < float("inf"))
        ):
            raise ServiceError(
                400, f"sampling_params.temperature: expected a number >= 0, found {temperature!r}"
            )
        if sp.get("top_k", -1) not in (-1, 0) or sp.get("top_p", 1) != 1:
            raise ServiceError(
                400, "sampling_params.top_k/top_p: not supported by the reference service "
                f"(expected -1 and 1), found {sp.get('top_k')!r} and {sp.get('top_p')!r}"
            )  # fmt: skip
        for field in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(field, 0):
                raise ServiceError(400, f"{field}: not supported by the reference service")
        if body.get("target_prompt_logprobs") is not None:
            raise ServiceError(
                400, "target_prompt_logprobs: not supported by the reference service"
            )
        seed = sp.get("seed")
        if seed is not None:
            _nonneg_int(seed, "sampling_params.seed")
        stops = self._stops(sp.get("stop"))
        include = bool(body.get("prompt_logprobs"))
        record = bool(body.get("record_stability_info"))
        params = s["params"]
        named = threading.Event()  # set once the request id (hence the sequence ids) exists
        box: dict[str, str] = {}

        def job():
            result = self._sampler.sample(
                params, tokens, num_samples=n, max_tokens=max_tokens,
                temperature=float(temperature), seed=seed, stop=stops,
                include_prompt_logprobs=include,
            )  # fmt: skip
            if record:  # before the result is visible: a training request may follow
                named.wait()
                ids = [f"{box['rid']}:{i}" for i in range(n)]
                session = sampler_id.split(":sample:")[0]
                self._records.record(session, ids, result["sequences"])
            return {"type": "sample", **result}

        with self._lock:
            rid = self._sample_seq.get((sampler_id, seq))
            if rid is None:
                rid = self._future(self._sample_worker.submit(job))
                self._sample_seq[(sampler_id, seq)] = rid
                box["rid"] = rid
                named.set()
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(n)]}


__all__ = ["TinkerSampling", "Worker"]

"""Sampling from the reference model: temperature, max_tokens, stop, seed, logprobs.

One compiled program per (padded batch, padded length) generates ``max_tokens`` tokens
for ``num_samples`` copies of a prompt; the loop runs on device (``lax.fori_loop``)
and re-reads the whole prefix each step (the model is small; no KV cache). The
randomness of position ``i`` is ``fold_in(key(seed), i)``, so a sequence is the same
whether it stops early or not, and stop sequences are applied on the host afterwards:
generation ends at the first stop sequence, which is kept in the tokens
(``stop_reason="stop"``); otherwise ``stop_reason="length"``.

A sampled token's logprob is taken under the distribution it was drawn from:
``log_softmax(logits / temperature)`` (for ``temperature=0``, greedy decoding, under
the model's own distribution). At ``temperature=1`` these are the model's logprobs,
the ``q`` of importance sampling.

Example:
  >>> import jax
  >>> from jaxreg.service import model, sampling
  >>> cfg = model.ModelConfig(d_model=16, n_layers=1, n_heads=2)
  >>> params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
  >>> s = sampling.Sampler(cfg)
  >>> out = s.sample(params, [1, 17], num_samples=4, max_tokens=8, temperature=1.0, seed=0)
  >>> [len(seq["tokens"]) for seq in out["sequences"]]
  [8, 8, 8, 8]
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg.service import model as model_lib


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _first_stop(tokens: list[int], stops: Sequence[Sequence[int]]) -> int | None:
    """The end (exclusive) of the earliest stop sequence in ``tokens``, or None."""
    ends = []
    for s in stops:
        s = list(s)
        for j in range(len(tokens) - len(s) + 1):
            if s and tokens[j : j + len(s)] == s:
                ends.append(j + len(s))
                break
    return min(ends) if ends else None


class Sampler:
    """Compiled sampling for one model configuration (thread-safe; shares compiles)."""

    def __init__(self, cfg: model_lib.ModelConfig):
        self.cfg = cfg
        self.traces = 0

        @functools.partial(jax.jit, static_argnames=())
        def generate(params, buf, start, steps, key, temperature):
            # buf: [B, L] int32 with the prompt in [0, start); fills [start, start + steps).
            self.traces += 1
            b, length = buf.shape

            def step(i, carry):
                buf, lps = carry
                pos = start + i
                logits = model_lib.logits(cfg, params, buf)  # [B, L, V]
                last = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
                greedy = temperature <= 0
                scaled = last / jnp.where(greedy, 1.0, temperature)
                logp = jax.nn.log_softmax(scaled, axis=-1)
                k = jax.random.fold_in(key, pos)
                drawn = jax.random.categorical(k, logp, axis=-1)
                tok = jnp.where(greedy, jnp.argmax(logp, axis=-1), drawn).astype(jnp.int32)
                lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
                buf = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], pos, axis=1)
                lps = jax.lax.dynamic_update_slice_in_dim(lps, lp[:, None], i, axis=1)
                return buf, lps

            lps = jnp.zeros((b, length), jnp.float32)
            return jax.lax.fori_loop(0, steps, step, (buf, lps))

        @jax.jit
        def prompt_logprobs(params, tokens, targets):
            return model_lib.token_logprobs(cfg, params, tokens, targets)

        self._generate = generate
        self._prompt_logprobs = prompt_logprobs

    def sample(
        self,
        params: Any,
        prompt: Sequence[int],
        *,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        stop: Sequence[Sequence[int]] = (),
        include_prompt_logprobs: bool = False,
    ) -> dict[str, Any]:
        """Samples ``num_samples`` continuations of ``prompt``.

        Returns:
          ``{"sequences": [{"tokens", "logprobs", "stop_reason"}], "prompt_logprobs"}``
          (``prompt_logprobs`` is ``None`` unless asked for; its first entry is NaN).
        """
        n_prompt = len(prompt)
        total = n_prompt + max_tokens
        length = min(_bucket(total, 16), self.cfg.context_length)
        b = _bucket(num_samples, 1)
        buf = np.zeros((b, length), np.int32)
        buf[:, :n_prompt] = np.asarray(prompt, np.int32)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        key = jax.random.key(np.uint32(seed % (1 << 32)))
        out, lps = self._generate(
            params, buf, np.int32(n_prompt), np.int32(max_tokens), key, np.float32(temperature)
        )
        out, lps = jax.device_get((out, lps))
        sequences = []
        for row in range(num_samples):
            toks = [int(t) for t in out[row, n_prompt:total]]
            end = _first_stop(toks, stop)
            reason = "length" if end is None else "stop"
            end = len(toks) if end is None else end
            sequences.append(
                {
                    "tokens": toks[:end],
                    "logprobs": [float(x) for x in lps[row, :end]],
                    "stop_reason": reason,
                }
            )
        result: dict[str, Any] = {"sequences": sequences, "prompt_logprobs": None}
        if include_prompt_logprobs:
            t = min(_bucket(n_prompt, 16), self.cfg.context_length)
            inp = np.zeros((1, t), np.int32)
            tgt = np.zeros((1, t), np.int32)
            inp[0, :n_prompt] = prompt
            tgt[0, : n_prompt - 1] = prompt[1:]
            lp = np.asarray(self._prompt_logprobs(params, inp, tgt))[0, : n_prompt - 1]
            result["prompt_logprobs"] = [float("nan"), *map(float, lp)]
        return result


class ProvenanceSpan(NamedTuple):
    """One run of a datum's ``loss_fn_input_spans`` (Tinker's provenance).

    ``sampled`` runs name ``[offset, offset + length)`` of a sampled sequence's tokens;
    the others (``PromptProvenanceSpan``) name positions of its request's prompt.
    """

    sampled: bool
    sequence_id: str
    offset: int
    length: int


class StabilityRecords:
    """What sampling with ``record_stability_info=True`` records, for ``stable_reinforce``.

    For every sampled sequence: its session, its tokens and the logprob each token had
    under the distribution it was drawn from. A training request names them by
    ``sequence_id`` through its datums' provenance (``resolve``), in the session that
    sampled them, for ``ttl_s`` (one day) after the last use; at most ``capacity``
    sequences are kept (the least recently used go first).

    Example:
      >>> r = StabilityRecords()
      >>> r.record("s", ["a"], [{"tokens": [5, 7], "logprobs": [-0.5, -1.5]}])
      >>> spans = [ProvenanceSpan(False, "a", 0, 1), ProvenanceSpan(True, "a", 0, 2)]
      >>> q, sampled = r.resolve("s", spans, [9, 5, 7], "data[0]")
      >>> q.tolist(), sampled.tolist()
      ([0.0, -0.5, -1.5], [0.0, 1.0, 1.0])
    """

    def __init__(self, capacity: int = 1 << 16, ttl_s: float = 86400.0):
        self.capacity, self.ttl_s = capacity, ttl_s
        self._lock = threading.Lock()
        self._seqs: collections.OrderedDict[str, tuple[str, np.ndarray, np.ndarray, float]] = (
            collections.OrderedDict()
        )

    def record(self, session: str, ids: Sequence[str], sequences: Sequence[dict]) -> None:
        """Records the ``sequences`` of one sampling request under their ``ids``."""
        now = time.monotonic()
        with self._lock:
            for sid, seq in zip(ids, sequences, strict=True):
                toks = np.asarray(seq["tokens"], np.int64)
                lps = np.asarray(seq["logprobs"], np.float32)
                self._seqs[sid] = (session, toks, lps, now)
                self._seqs.move_to_end(sid)
            while len(self._seqs) > self.capacity:
                self._seqs.popitem(last=False)

    def resolve(
        self, session: str, spans: Sequence[ProvenanceSpan], targets: Any, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The recorded logprobs ``q`` and the 0/1 ``sampled`` mask over ``targets``' rows.

        Raises ``ValueError`` naming ``where``'s field when the spans do not tile the
        targets, name an unknown, expired or other session's sequence, or claim a
        token the sequence did not sample.
        """
        targets = np.asarray(targets)
        n = targets.shape[0]
        field = f"{where}.loss_fn_input_spans"
        total = sum(sp.length for sp in spans)
        if total != n:
            raise ValueError(
                f"{field}: the spans cover {total} positions, expected {n} (one per target)"
            )
        q = np.zeros(n, np.float32)
        sampled = np.zeros(n, np.float32)
        now, pos = time.monotonic(), 0
        with self._lock:
            for j, sp in enumerate(spans):
                if sp.sampled and sp.length:
                    rec = self._seqs.get(sp.sequence_id)
                    if rec is not None and now - rec[3] > self.ttl_s:
                        del self._seqs[sp.sequence_id]
                        rec = None
                    if rec is None or rec[0] != session:
                        raise ValueError(
                            f"{field}[{j}].sequence_id: no recorded sequence "
                            f"{sp.sequence_id!r} in this session (sample with "
                            "record_stability_info=True, in the session that trains; "
                            f"records last {self.ttl_s:g} s after their last use)"
                        )
                    _, toks, lps, _ = rec
                    end = sp.offset + sp.length
                    if end > len(toks):
                        raise ValueError(
                            f"{field}[{j}]: positions [{sp.offset}, {end}) of sequence "
                            f"{sp.sequence_id!r}, which sampled {len(toks)} tokens"
                        )
                    claimed = targets[pos : pos + sp.length]
                    claimed = claimed[:, 0] if claimed.ndim > 1 else claimed
                    if not np.array_equal(claimed, toks[sp.offset : end]):
                        raise ValueError(
                            f"{field}[{j}]: target_tokens[{pos}:{pos + sp.length}] "
                            f"{claimed.tolist()} are not the tokens sequence "
                            f"{sp.sequence_id!r} sampled there {toks[sp.offset : end].tolist()}"
                        )
                    q[pos : pos + sp.length] = lps[sp.offset : end]
                    sampled[pos : pos + sp.length] = 1.0
                    self._seqs[sp.sequence_id] = (*rec[:3], now)  # restarts its day
                    self._seqs.move_to_end(sp.sequence_id)
                pos += sp.length
        return q, sampled

"""The token batch: padded per-token arrays with a mask, and ragged <-> padded packing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import gather
from jaxreg._src.core.term import InputError
from jaxreg._src.terms.masking import expand, token_mean

Bucket = str | int | Sequence[int] | None


class BatchError(InputError):
    """A batch, or the ragged data it is packed from, is malformed.

    The message names the field, what was expected and what was found.
    """


class MissingInputError(BatchError, KeyError):
    """``batch[name]`` names an input the batch does not hold (also a ``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Padded per-token inputs with a mask: the ``batch`` argument of token-level terms.

    Attributes:
      mask: ``[B, T]``, 1 for real tokens and 0 for padding (any numeric or bool dtype).
      inputs: padded per-token arrays named like Tinker's ``loss_fn_inputs``
        (``target_tokens``, ``weights``, ``advantages``, ``ref_logprobs``, ...), each
        ``[B, T]`` or ``[B, T, K]``. One exception: the sampling policy's logprobs are
        ``sampling_logprobs`` (Tinker's ``logprobs``; ``forward_backward_custom``
        renames them), since ``x`` is the current policy's logprobs.
      num_datums: how many leading rows are real datums when
        [`from_ragged`][jaxreg.Batch.from_ragged] padded the batch dimension (``batch_bucket``);
        ``None`` means all rows.

    Logprobs ``x`` are ``[B, T]``, or ``[B, T, K]`` for multi-target data; the mask stays
    ``[B, T]``. Build one from per-datum arrays of different lengths with
    [`from_ragged`][jaxreg.Batch.from_ragged], and go back with [`unpad`][jaxreg.Batch.unpad].

    Example:
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> x, batch = jr.Batch.from_ragged(
      ...     [np.array([-1.0, -2.0]), np.array([-0.5])],
      ...     {"weights": [np.ones(2), np.ones(1)]},
      ... )
      >>> x.shape, batch.mask.shape
      ((2, 8), (2, 8))
      >>> [a.tolist() for a in batch.unpad(x)]
      [[-1.0, -2.0], [-0.5]]
    """

    mask: jax.Array
    inputs: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    num_datums: jax.Array | None = None

    def __getitem__(self, key: str) -> jax.Array:
        if key not in self.inputs:
            hint = ""
            if key == "logprobs" and "sampling_logprobs" in self.inputs:
                hint = (
                    " The sampling policy's logprobs are batch['sampling_logprobs'] (Tinker's "
                    "loss_fn_inputs['logprobs']); the current policy's are x."
                )
            raise MissingInputError(
                f"batch[{key!r}]: no such input; found {sorted(self.inputs)}.{hint}"
            )
        return self.inputs[key]

    @property
    def lengths(self) -> np.ndarray:
        """Per-datum lengths (read from the mask on the host).

        A mask that spans several processes (``jax.distributed``) is gathered whole: every
        process gets all the lengths (a collective: call it on every process).
        """
        return gather.to_host(self.mask).astype(bool).sum(axis=1)

    def unpad(self, array: Any) -> list[np.ndarray]:
        """Splits a padded ``[B, T, ...]`` array back into per-datum NumPy arrays.

        Padded datums (rows added by ``batch_bucket``) are dropped, so the result has one
        entry per datum given to [`from_ragged`][jaxreg.Batch.from_ragged]. Arrays that span
        several processes (``jax.distributed``) are gathered whole first, so every process
        gets every datum (a collective: call it on every process).
        """
        array = gather.to_host(array)
        mask = gather.to_host(self.mask)
        if array.shape[:2] != mask.shape:
            raise BatchError(
                f"unpad: array must be [B, T, ...] with [B, T] = {mask.shape} (the mask); "
                f"found shape {array.shape}."
            )
        n = mask.shape[0] if self.num_datums is None else int(gather.to_host(self.num_datums))
        lengths = mask.astype(bool).sum(axis=1)
        return [array[i, : lengths[i]] for i in range(n)]

    @classmethod
    def from_ragged(
        cls,
        logprobs: Sequence[Any],
        inputs: Mapping[str, Sequence[Any]] | None = None,
        *,
        bucket: Bucket = "pow2",
        min_length: int = 8,
        batch_bucket: Bucket = None,
        dtype: Any = None,
    ) -> tuple[jax.Array, Batch]:
        """Packs per-datum arrays of different lengths into padded arrays and a mask.

        Args:
          logprobs: one array per datum, ``[T_i]`` or ``[T_i, K]`` (same ``K`` for all).
          inputs: ``{name: [one array per datum]}``, each ``[T_i]`` or ``[T_i, K]``.
          bucket: the padded length: ``"pow2"`` (next power of two, at least
            ``min_length``), an int ``m`` (next multiple of ``m``), a sorted list of
            allowed lengths (the smallest that fits), or ``None`` (the longest datum).
            A stream of batches of random lengths then compiles once per bucket.
          min_length: the smallest padded length for ``"pow2"``.
          batch_bucket: pads the number of datums the same way (rows of mask 0), so that
            varying batch sizes compile a bounded number of times too. Default: no padding.
          dtype: the floating dtype of the padded logprobs and floating inputs. ``None``
            (default): each keeps its own, as JAX would store it: float64 stays float64
            when x64 is enabled (``jax.config.update("jax_enable_x64", True)``) and
            becomes float32 otherwise; float32 and bfloat16 stay as they are; integer
            logprobs become JAX's default float.

        Returns:
          ``(x, batch)``: padded logprobs ``[B, T]`` or ``[B, T, K]`` and the
          [`Batch`][jaxreg.Batch].
        """
        n = len(logprobs)
        arrays = [np.asarray(a) for a in logprobs]
        lengths = np.array([a.shape[0] if a.ndim else -1 for a in arrays], np.int64)
        for i, a in enumerate(arrays):
            if a.ndim not in (1, 2):
                raise BatchError(
                    f"logprobs[{i}]: expected a [T] or [T, K] array; found shape {a.shape}."
                )
        max_len = int(lengths.max()) if n else 0
        t = _bucket(bucket, max_len, min_length, "bucket")
        b = _bucket(batch_bucket, n, 1, "batch_bucket") if batch_bucket is not None else n
        x = _pad(arrays, lengths, b, t, "logprobs", dtype, floating=True)
        rows = np.arange(b)[:, None]
        mask = (np.arange(t)[None, :] < np.pad(lengths, (0, b - n))[rows[:, 0], None]).astype(
            np.float32
        )
        packed = {}
        for name, values in (inputs or {}).items():
            if len(values) != n:
                raise BatchError(
                    f"inputs[{name!r}]: expected one array per datum ({n}); found {len(values)}."
                )
            per = [np.asarray(v) for v in values]
            for i, v in enumerate(per):
                if v.ndim == 0 or v.shape[0] != lengths[i]:
                    raise BatchError(
                        f"inputs[{name!r}][{i}]: expected length {lengths[i]} (the length of "
                        f"logprobs[{i}]); found shape {v.shape}."
                    )
            packed[name] = _pad(per, lengths, b, t, f"inputs[{name!r}]", dtype)
        num = None if batch_bucket is None else jnp.asarray(n, jnp.int32)
        batch = cls(jnp.asarray(mask), {k: jnp.asarray(v) for k, v in packed.items()}, num)
        return jnp.asarray(x), batch


def _bucket(bucket: Bucket, length: int, minimum: int, field: str) -> int:
    if bucket is None:
        return length
    if bucket == "pow2":
        return max(minimum, 1 << max(0, length - 1).bit_length())
    if isinstance(bucket, int) and not isinstance(bucket, bool):
        if bucket <= 0:
            raise BatchError(f"{field}: a multiple must be positive; found {bucket}.")
        return max(bucket, -(-length // bucket) * bucket)
    if isinstance(bucket, Sequence) and not isinstance(bucket, str):
        for size in sorted(bucket):
            if size >= length:
                return int(size)
        raise BatchError(
            f"{field}: the longest datum has length {length}, more than the largest allowed "
            f"length {max(bucket)}."
        )
    raise BatchError(
        f"{field}: expected 'pow2', a positive int, a list of lengths or None; found {bucket!r}."
    )


def _pad(arrays, lengths, b, t, field, dtype, floating=False) -> np.ndarray:
    """Padding by one block copy per datum (memcpy speed; no per-token Python loop).

    ``floating``: the result is floating even for integer data (the logprobs).
    """
    tails = {a.shape[1:] for a in arrays}
    if len(tails) > 1:
        raise BatchError(
            f"{field}: all datums need the same trailing shape; found {sorted(tails)}."
        )
    tail = tails.pop() if tails else ()
    kind = np.result_type(*arrays) if arrays else np.dtype(dtype or np.float32)
    if floating and not np.issubdtype(kind, np.inexact):
        kind = np.dtype(jnp.zeros(()).dtype)
    if np.issubdtype(kind, np.integer) or kind == np.bool_:
        out_dtype = np.dtype(np.int32) if kind.itemsize > 4 else kind
    elif dtype is not None:
        out_dtype = np.dtype(dtype)
    else:
        out_dtype = np.dtype(jax.dtypes.canonicalize_dtype(kind))
    out = np.zeros((b, t, *tail), out_dtype)
    for i, a in enumerate(arrays):
        out[i, : lengths[i]] = a
    return out


def per_datum(
    fn: Callable[[jax.Array, dict[str, jax.Array]], Any], *, reduction: str = "sum"
) -> Callable[[jax.Array, Batch], Any]:
    """Lifts a per-datum loss ``fn(logprobs_row, inputs_row)`` to a batch term.

    The row function sees one padded row: padded positions hold 0 in the logprobs and in
    every input, and ``inputs_row["mask"]`` marks the real tokens, so losses written as
    sums over tokens (as Tinker's are) port unchanged. ``fn`` may return a scalar or
    ``(scalar, metrics)``; metrics are averaged over the real datums.

    Args:
      fn: ``fn(logprobs_row, inputs_row) -> loss`` for one datum.
      reduction: ``"sum"`` over datums (Tinker's convention) or ``"mean"`` over the
        non-empty datums.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> nll = jr.per_datum(lambda lp, inp: -jnp.sum(inp["weights"] * lp))
      >>> x, batch = jr.Batch.from_ragged(
      ...     [np.array([-1.0, -2.0]), np.array([-0.5])], {"weights": [np.ones(2), np.ones(1)]}
      ... )
      >>> float(nll(x, batch)[0])
      3.5
    """
    if reduction not in ("sum", "mean"):
        raise BatchError(f"per_datum: reduction must be 'sum' or 'mean'; found {reduction!r}.")

    def term(x: jax.Array, batch: Batch):
        mask = batch.mask.astype(x.dtype)
        xs = jnp.where(expand(mask, x) > 0, x, 0)
        inputs = {k: jnp.where(expand(mask, v) > 0, v, 0) for k, v in batch.inputs.items()}
        inputs["mask"] = mask
        out = jax.vmap(fn)(xs, inputs)
        losses, metrics = out if isinstance(out, tuple) else (out, {})
        real = (jnp.sum(mask, axis=1) > 0).astype(losses.dtype)
        loss = token_mean(losses, real) if reduction == "mean" else jnp.sum(losses * real)
        return loss, {k: token_mean(v, real) for k, v in metrics.items()}

    term.__name__ = getattr(fn, "__name__", "per_datum")
    return term

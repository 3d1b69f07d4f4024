"""The plan of a composed objective: its terms and flags, validated once and frozen.

A ``Plan`` is everything static about an objective: which terms, in which order,
which of them read the model stage's outputs and which the parameters, what to compute
(norms, cosines, per-term gradients) and how (the groups of terms that share one VJP).
The compiled program (``jaxreg._src.core.program``) is a set of pure functions of a
plan and arrays; [`jaxreg.Objective`][jaxreg.Objective] only adds the call-time conveniences.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from jaxreg._src.core.errors import TermError
from jaxreg._src.core.term import Term

__all__ = ["GRAD_SPACES", "GradSpace", "GradStrategy", "Plan", "make_plan"]

GradStrategy = Literal["auto", "per_term", "vmap", "sequential"] | Sequence[Sequence[str]]
GradSpace = Literal["x", "logits"]
GRAD_SPACES = ("x", "logits")


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """What one composed objective computes (immutable; built by ``make_plan``).

    Attributes:
      terms: the terms, the base first when ``has_base``.
      has_base: whether ``terms[0]`` is the base loss.
      track_grad_norms, term_grads, grad_conflicts: what to report (see ``compose``).
      grad_strategy: as given to ``compose`` (``"auto"`` is resolved at trace time).
      grad_space: ``"x"`` or ``"logits"``.
      forward: the model stage ``forward(params, batch) -> outputs``, or ``None``.
      forward_has_aux: ``forward`` returns ``(outputs, aux)``; ``aux`` is returned as
        ``out.aux`` (e.g. a model's updated BatchNorm statistics).
      memory_budget: bytes the stacked per-term gradients may take before ``"auto"``
        switches to ``"sequential"``; ``None``: no budget.
      axis_name: the ``shard_map`` mesh axes over which values, metrics, norms and the
        Gramian are made global (a tuple of names), or ``None``.
    """

    terms: tuple[Term, ...]
    has_base: bool
    track_grad_norms: bool
    term_grads: bool
    grad_conflicts: bool
    grad_strategy: GradStrategy
    grad_space: str
    forward: Callable[[Any, Any], Any] | None
    forward_has_aux: bool = False
    memory_budget: int | None = None
    axis_name: tuple[str, ...] | None = None

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @functools.cached_property
    def groups(self) -> tuple[tuple[int, ...], ...] | None:
        """The VJP groups, or ``None`` for ``"auto"`` (decided from the traced shapes)."""
        if self.grad_strategy == "auto":
            return None
        return _groups(self.grad_strategy, self.names)

    @property
    def needs_jacobian(self) -> bool:
        """Whether every term's own gradient is computed (any diagnostic flag)."""
        return self.track_grad_norms or self.term_grads or self.grad_conflicts

    @functools.cached_property
    def scheduled(self) -> bool:
        return any(t.scheduled for t in self.terms)

    @functools.cached_property
    def fixed_weights(self) -> np.ndarray:
        """The terms' own weights; NaN where the compiled program evaluates a schedule."""
        return np.array([np.nan if t.scheduled else t.weight for t in self.terms], np.float32)

    @functools.cached_property
    def reads_params(self) -> tuple[bool, ...]:
        """Per term: whether ``fn`` reads the parameters rather than the forward's output."""
        return tuple(self.forward is not None and t.on == "params" for t in self.terms)

    def restrict(self, keep: Sequence[int]) -> Plan:
        """The plan of the terms at indices ``keep`` (in order), with the same flags."""
        return dataclasses.replace(
            self,
            terms=tuple(self.terms[i] for i in keep),
            has_base=self.has_base and 0 in keep,
            term_grads=False,
            grad_conflicts=False,
            grad_strategy=_restrict_strategy(self.grad_strategy, [self.names[i] for i in keep]),
        )


def make_plan(
    base: Term | None,
    regularizers: tuple[Term, ...],
    *,
    track_grad_norms: bool = False,
    term_grads: bool = False,
    grad_conflicts: bool = False,
    grad_strategy: GradStrategy = "auto",
    grad_space: GradSpace = "x",
    forward: Callable[[Any, Any], Any] | None = None,
    forward_has_aux: bool = False,
    memory_budget: int | None = None,
    axis_name: Any = None,
    host_types: tuple[type, ...] = (),
) -> Plan:
    """Validates the flags of ``compose`` and returns the frozen ``Plan``.

    ``host_types`` are the term classes that run on the host (``HostTerm``): they may
    not be the base, nor be combined with ``term_grads``/``grad_conflicts``/``forward``.
    """
    if grad_space not in GRAD_SPACES:
        raise TermError(f"grad_space must be one of {list(GRAD_SPACES)}; found {grad_space!r}.")
    if forward is not None and not callable(forward):
        raise TermError(
            f"forward must be callable as forward(params, batch) -> outputs; found {forward!r}."
        )
    if forward_has_aux and forward is None:
        raise TermError(
            "forward_has_aux=True describes the model stage's return value; pass "
            "forward=apply_fn returning (outputs, aux) too."
        )
    if forward is not None and grad_space != "x":
        raise TermError(
            "grad_space='logits' describes x as log-probabilities; with forward= the "
            "differentiated input is the parameters, so use grad_space='x' there."
        )
    terms = ((base,) if base is not None else ()) + regularizers
    if base is not None and isinstance(base, host_types):
        raise TermError(f"HostTerm {base.name!r}: the base loss must be a JAX term.")
    host = [t.name for t in regularizers if isinstance(t, host_types)]
    if host and (term_grads or grad_conflicts):
        raise TermError(
            f"host terms {host}: term_grads and grad_conflicts need every term's gradient "
            "inside one program; use track_grad_norms (supported) or make the terms JAX "
            "functions."
        )
    if host and forward is not None:
        raise TermError(
            f"host terms {host}: a model stage (forward=) runs inside the compiled program; "
            "host terms read x on the host. Compose them without forward=."
        )
    axis_names = _check_axis_name(axis_name)
    if host and axis_names:
        raise TermError(
            f"host terms {host}: with axis_name= the objective runs inside shard_map, where "
            "each shard would call a host term on its own block; compose them without "
            "axis_name (under jax.jit on global arrays)."
        )
    if forward is None:
        on_params = [t.name for t in terms if t.on == "params"]
        if on_params:
            raise TermError(
                f"terms {on_params} have on='params', which needs a model stage: "
                "compose(..., forward=apply_fn) (without one, every term reads x)."
            )
    plan = Plan(
        terms=terms,
        has_base=base is not None,
        track_grad_norms=bool(track_grad_norms),
        term_grads=bool(term_grads),
        grad_conflicts=bool(grad_conflicts),
        grad_strategy=grad_strategy,
        grad_space=grad_space,
        forward=forward,
        forward_has_aux=bool(forward_has_aux),
        memory_budget=_check_budget(memory_budget),
        axis_name=axis_names,
    )
    _ = plan.groups  # validates an explicit list of groups now, not at the first call
    return plan


def _check_budget(budget: Any) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        raise TermError(
            f"memory_budget must be a positive number of bytes or None; found {budget!r}."
        )
    return int(budget)


def _check_axis_name(axis_name: Any) -> tuple[str, ...] | None:
    """``axis_name`` as a tuple of mesh axis names (``None`` stays ``None``)."""
    if axis_name is None:
        return None
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    ok = isinstance(names, tuple | list) and names and all(isinstance(a, str) and a for a in names)
    if not ok or len(set(names)) != len(names):
        raise TermError(
            "axis_name must be a mesh axis name or a tuple of distinct names (the axes of "
            f"the shard_map the objective is called in, e.g. 'data'); found {axis_name!r}."
        )
    return tuple(names)


def _restrict_strategy(strategy: GradStrategy, names: list[str]) -> GradStrategy:
    if isinstance(strategy, str):
        return strategy
    kept = set(names)
    return [tuple(n for n in ((g,) if isinstance(g, str) else g) if n in kept) for g in strategy]


def _groups(strategy: GradStrategy, names: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    n = len(names)
    if strategy in ("per_term", "sequential"):
        # "sequential" materialises per term only with term_grads (see program.run).
        return tuple((i,) for i in range(n))
    if strategy == "vmap":
        return (tuple(range(n)),)
    if isinstance(strategy, str) or not isinstance(strategy, Sequence):
        raise TermError(
            "grad_strategy must be 'auto', 'per_term', 'vmap', 'sequential' or a list of "
            f"groups of term names; found {strategy!r}."
        )
    index = {name: i for i, name in enumerate(names)}
    groups, seen = [], set()
    for group in strategy:
        if isinstance(group, str):
            group = (group,)
        ids = []
        for name in group:
            if name not in index:
                raise TermError(f"grad_strategy: unknown term {name!r}; terms are {list(names)}.")
            if name in seen:
                raise TermError(f"grad_strategy: term {name!r} is in more than one group.")
            seen.add(name)
            ids.append(index[name])
        if ids:
            groups.append(tuple(ids))
    groups.extend((i,) for i, name in enumerate(names) if name not in seen)
    return tuple(groups)

"""Base losses on padded token batches, matching the Tinker service's definitions."""

from jaxreg._src.terms.losses import cross_entropy as cross_entropy
from jaxreg._src.terms.losses import dpo as dpo
from jaxreg._src.terms.losses import importance_sampling as importance_sampling
from jaxreg._src.terms.losses import ppo as ppo

__all__ = [
    "cross_entropy",
    "dpo",
    "importance_sampling",
    "ppo",
]

"""Base losses on padded token batches, matching the Tinker service's definitions."""

from jaxreg._src.losses import cross_entropy as cross_entropy
from jaxreg._src.losses import dpo as dpo
from jaxreg._src.losses import importance_sampling as importance_sampling
from jaxreg._src.losses import ppo as ppo

"""optax transforms: regularizers inside ``optax.chain``."""

from jaxreg._src.optim.transforms import RegularizeState as RegularizeState
from jaxreg._src.optim.transforms import metrics as metrics
from jaxreg._src.optim.transforms import regularize as regularize

__all__ = [
    "RegularizeState",
    "metrics",
    "regularize",
]

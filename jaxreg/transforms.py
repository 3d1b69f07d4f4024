"""optax transforms: regularizers inside ``optax.chain``."""

from jaxreg._src.transforms import RegularizeState as RegularizeState
from jaxreg._src.transforms import metrics as metrics
from jaxreg._src.transforms import regularize as regularize

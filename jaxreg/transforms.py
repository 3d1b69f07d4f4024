"""optax transforms: regularizers inside ``optax.chain``."""

from jaxreg._src.optim.transforms import RegularizeOrderWarning as RegularizeOrderWarning
from jaxreg._src.optim.transforms import RegularizeState as RegularizeState
from jaxreg._src.optim.transforms import TransformError as TransformError
from jaxreg._src.optim.transforms import metrics as metrics
from jaxreg._src.optim.transforms import regularize as regularize
from jaxreg._src.optim.transforms import regularized as regularized

"""Aggregators of per-term gradients (``optax.experimental.aggregating.Aggregator``)."""

from jaxreg._src.optim.aggregators import WeightingState as WeightingState
from jaxreg._src.optim.aggregators import cagrad as cagrad
from jaxreg._src.optim.aggregators import cagrad_weights as cagrad_weights
from jaxreg._src.optim.aggregators import combine as combine
from jaxreg._src.optim.aggregators import from_weighting as from_weighting
from jaxreg._src.optim.aggregators import gramian as gramian
from jaxreg._src.optim.aggregators import mgda as mgda
from jaxreg._src.optim.aggregators import mgda_weights as mgda_weights
from jaxreg._src.optim.aggregators import nash_mtl as nash_mtl
from jaxreg._src.optim.aggregators import nash_mtl_weights as nash_mtl_weights
from jaxreg._src.optim.aggregators import pcgrad as pcgrad
from jaxreg._src.optim.aggregators import pcgrad_weights as pcgrad_weights
from jaxreg._src.optim.aggregators import upgrad as upgrad
from jaxreg._src.optim.aggregators import upgrad_weights as upgrad_weights
from jaxreg._src.optim.aggregators import weighted_sum as weighted_sum

"""Aggregators of per-term gradients (``optax.experimental.aggregating.Aggregator``).

The Gramian weight functions (``*_weights``), :func:`gramian`, :func:`apply_weights` and
:func:`from_gramian_weights` are the pieces each aggregator is built from; see
:mod:`jaxreg._src.optim.aggregators` for their conventions.
"""

from jaxreg._src.optim.aggregators import AggregatorState as AggregatorState
from jaxreg._src.optim.aggregators import GramianWeightFn as GramianWeightFn
from jaxreg._src.optim.aggregators import apply_weights as apply_weights
from jaxreg._src.optim.aggregators import cagrad as cagrad
from jaxreg._src.optim.aggregators import cagrad_weights as cagrad_weights
from jaxreg._src.optim.aggregators import from_gramian_weights as from_gramian_weights
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

__all__ = [
    "AggregatorState",
    "GramianWeightFn",
    "apply_weights",
    "cagrad",
    "cagrad_weights",
    "from_gramian_weights",
    "gramian",
    "mgda",
    "mgda_weights",
    "nash_mtl",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_weights",
    "upgrad",
    "upgrad_weights",
    "weighted_sum",
]

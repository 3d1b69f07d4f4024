"""Aggregators of per-term gradients (``optax.experimental.aggregating.Aggregator``).

Each aggregator is built from three steps, public too: ``gramian`` ``(stacked) ->
G``; a Gramian weight function ``<method>_weights(gramian, *, <options>,
with_residual=False) -> weights`` (the Gramian is the only positional argument, the
options are keyword-only with the aggregator's names and defaults, ``with_residual=True``
returns ``(weights, residual)``, and PCGrad's randomness is a required ``key=``, used and
not returned); and ``apply_weights`` ``(weights, stacked) -> w^T J``.
``from_gramian_weights`` turns any ``fn(gramian, key) -> (weights, residual)``
(``GramianWeightFn``) into an aggregator whose state is ``AggregatorState``.
Adaptive weights of the loss terms are ``jaxreg.weighting``.
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
from jaxreg._src.optim.aggregators_conflict import GradVacState as GradVacState
from jaxreg._src.optim.aggregators_conflict import aligned_mtl as aligned_mtl
from jaxreg._src.optim.aggregators_conflict import aligned_mtl_weights as aligned_mtl_weights
from jaxreg._src.optim.aggregators_conflict import config as config
from jaxreg._src.optim.aggregators_conflict import config_weights as config_weights
from jaxreg._src.optim.aggregators_conflict import dualproj as dualproj
from jaxreg._src.optim.aggregators_conflict import dualproj_weights as dualproj_weights
from jaxreg._src.optim.aggregators_conflict import graddrop as graddrop
from jaxreg._src.optim.aggregators_conflict import gradvac as gradvac
from jaxreg._src.optim.aggregators_conflict import gradvac_weights as gradvac_weights
from jaxreg._src.optim.aggregators_conflict import krum as krum
from jaxreg._src.optim.aggregators_conflict import krum_weights as krum_weights
from jaxreg._src.optim.aggregators_conflict import trimmed_mean as trimmed_mean
from jaxreg._src.optim.aggregators_jd import imtl_g as imtl_g
from jaxreg._src.optim.aggregators_jd import imtl_g_weights as imtl_g_weights
from jaxreg._src.optim.aggregators_jd import random as random
from jaxreg._src.optim.aggregators_jd import random_weights as random_weights

# isort: split
# FairGrad, PCD and ExcessMTL (TorchJD); the cross-Gramian of two batches.
from jaxreg._src.optim.aggregators_adaptive import ExcessMTLState as ExcessMTLState
from jaxreg._src.optim.aggregators_adaptive import PCDState as PCDState
from jaxreg._src.optim.aggregators_adaptive import cross_gramian as cross_gramian
from jaxreg._src.optim.aggregators_adaptive import excess_mtl as excess_mtl
from jaxreg._src.optim.aggregators_adaptive import fairgrad as fairgrad
from jaxreg._src.optim.aggregators_adaptive import fairgrad_weights as fairgrad_weights
from jaxreg._src.optim.aggregators_adaptive import pcd as pcd
from jaxreg._src.optim.aggregators_adaptive import pcd_weights as pcd_weights

__all__ = [
    "AggregatorState",
    "GramianWeightFn",
    "apply_weights",
    "cagrad",
    "cagrad_weights",
    "from_gramian_weights",
    "gramian",
    "imtl_g",
    "imtl_g_weights",
    "mgda",
    "mgda_weights",
    "nash_mtl",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_weights",
    "random",
    "random_weights",
    "upgrad",
    "upgrad_weights",
    "weighted_sum",
    # AlignedMTL, ConFIG, DualProj, GradDrop, GradVac, Krum, TrimmedMean
    "GradVacState",
    "aligned_mtl",
    "aligned_mtl_weights",
    "config",
    "config_weights",
    "dualproj",
    "dualproj_weights",
    "graddrop",
    "gradvac",
    "gradvac_weights",
    "krum",
    "krum_weights",
    "trimmed_mean",
    # FairGrad, PCD, ExcessMTL
    "ExcessMTLState",
    "PCDState",
    "cross_gramian",
    "excess_mtl",
    "fairgrad",
    "fairgrad_weights",
    "pcd",
    "pcd_weights",
]

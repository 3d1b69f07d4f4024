"""Adaptive loss-term weighting: ``init(out)``, ``update(out, state) -> (weights, state)``."""

from jaxreg._src.optim.weighting import BalanceGradNormsState as BalanceGradNormsState
from jaxreg._src.optim.weighting import DWAState as DWAState
from jaxreg._src.optim.weighting import FAMOState as FAMOState
from jaxreg._src.optim.weighting import GradNormState as GradNormState
from jaxreg._src.optim.weighting import UncertaintyState as UncertaintyState
from jaxreg._src.optim.weighting import Weighting as Weighting
from jaxreg._src.optim.weighting import balance_grad_norms as balance_grad_norms
from jaxreg._src.optim.weighting import dwa as dwa
from jaxreg._src.optim.weighting import famo as famo
from jaxreg._src.optim.weighting import gradnorm as gradnorm
from jaxreg._src.optim.weighting import uncertainty as uncertainty

# isort: split
# Weightings on a task-by-task matrix (MoDo, SDMGrad, CR-MOGM).
from jaxreg._src.optim.weighting_matrix import CRMOGMState as CRMOGMState
from jaxreg._src.optim.weighting_matrix import MatrixWeighting as MatrixWeighting
from jaxreg._src.optim.weighting_matrix import MoDoState as MoDoState
from jaxreg._src.optim.weighting_matrix import SDMGradState as SDMGradState
from jaxreg._src.optim.weighting_matrix import WeightingAggregatorState as WeightingAggregatorState
from jaxreg._src.optim.weighting_matrix import as_aggregator as as_aggregator
from jaxreg._src.optim.weighting_matrix import cr_mogm as cr_mogm
from jaxreg._src.optim.weighting_matrix import modo as modo
from jaxreg._src.optim.weighting_matrix import project_simplex as project_simplex
from jaxreg._src.optim.weighting_matrix import sdmgrad as sdmgrad

__all__ = [
    "BalanceGradNormsState",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "UncertaintyState",
    "Weighting",
    "balance_grad_norms",
    "dwa",
    "famo",
    "gradnorm",
    "uncertainty",
    # MoDo, SDMGrad, CR-MOGM
    "CRMOGMState",
    "MatrixWeighting",
    "MoDoState",
    "SDMGradState",
    "WeightingAggregatorState",
    "as_aggregator",
    "cr_mogm",
    "modo",
    "project_simplex",
    "sdmgrad",
]

"""Adaptive term weighting: ``init(out)``, ``update(out, state) -> (weights, state)``."""

from jaxreg._src.weighting import Weighting as Weighting
from jaxreg._src.weighting import balance_grad_norms as balance_grad_norms
from jaxreg._src.weighting import dwa as dwa
from jaxreg._src.weighting import famo as famo
from jaxreg._src.weighting import gradnorm as gradnorm
from jaxreg._src.weighting import uncertainty as uncertainty

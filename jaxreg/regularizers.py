"""Regularizers: norms on any pytree, and entropy, KL, consistency... on token batches."""

from jaxreg._src.terms.pytrees import NonParamStateWarning as NonParamStateWarning
from jaxreg._src.terms.regularizers import confidence_penalty as confidence_penalty
from jaxreg._src.terms.regularizers import consistency as consistency
from jaxreg._src.terms.regularizers import elastic_net as elastic_net
from jaxreg._src.terms.regularizers import entropy as entropy
from jaxreg._src.terms.regularizers import kl as kl
from jaxreg._src.terms.regularizers import l1 as l1
from jaxreg._src.terms.regularizers import l2 as l2
from jaxreg._src.terms.regularizers import length_penalty as length_penalty
from jaxreg._src.terms.regularizers import smoothness as smoothness

__all__ = [
    "NonParamStateWarning",
    "confidence_penalty",
    "consistency",
    "elastic_net",
    "entropy",
    "kl",
    "l1",
    "l2",
    "length_penalty",
    "smoothness",
]

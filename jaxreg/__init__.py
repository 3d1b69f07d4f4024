"""jaxreg: structured loss composition in JAX.

Compose a base loss with named, weighted regularizers into one compiled program that
returns the total loss, every term's value, contribution and gradient norm, and the
gradient.
"""

from jaxreg import aggregators as aggregators
from jaxreg import losses as losses
from jaxreg import regularizers as regularizers
from jaxreg import remote as remote
from jaxreg import telemetry as telemetry
from jaxreg import transforms as transforms
from jaxreg import weighting as weighting
from jaxreg._src.core.compose import Objective as Objective
from jaxreg._src.core.compose import compose as compose
from jaxreg._src.core.errors import JaxregError as JaxregError
from jaxreg._src.core.errors import NotComputedError as NotComputedError
from jaxreg._src.core.guards import NonFiniteError as NonFiniteError
from jaxreg._src.core.guards import check_finite as check_finite
from jaxreg._src.core.host import HostTerm as HostTerm
from jaxreg._src.core.host import HostTermError as HostTermError
from jaxreg._src.core.output import CompositeOutput as CompositeOutput
from jaxreg._src.core.output import TermOutput as TermOutput
from jaxreg._src.core.term import MAX_TERMS as MAX_TERMS
from jaxreg._src.core.term import InputError as InputError
from jaxreg._src.core.term import Term as Term
from jaxreg._src.core.term import TermError as TermError
from jaxreg._src.terms.batch import Batch as Batch
from jaxreg._src.terms.batch import BatchError as BatchError
from jaxreg._src.terms.batch import per_datum as per_datum

__version__ = "0.1.0"

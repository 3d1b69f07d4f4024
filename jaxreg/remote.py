"""Remote training: clients for a training service and ``forward_backward_custom``.

See :mod:`jaxreg._src.custom` for how a composed objective is linearised into the
service's cross-entropy loss, and :mod:`jaxreg._src.client` for the transport.
"""

from jaxreg._src.client import APIFuture as APIFuture
from jaxreg._src.client import RemoteError as RemoteError
from jaxreg._src.client import RetryPolicy as RetryPolicy
from jaxreg._src.client import ServiceClient as ServiceClient
from jaxreg._src.client import TrainingClient as TrainingClient
from jaxreg._src.custom import CustomFuture as CustomFuture
from jaxreg._src.custom import CustomResult as CustomResult
from jaxreg._src.custom import forward_backward_custom as forward_backward_custom
from jaxreg._src.custom import forward_backward_custom_async as forward_backward_custom_async
from jaxreg._src.guards import NonFiniteError as NonFiniteError
from jaxreg._src.guards import check_finite as check_finite
from jaxreg._src.param_diagnostics import ParamDiagnostics as ParamDiagnostics
from jaxreg._src.param_diagnostics import UnsupportedExtensionError as UnsupportedExtensionError
from jaxreg._src.tinker import TinkerTrainingClient as TinkerTrainingClient
from jaxreg._src.tinker import to_tinker_datum as to_tinker_datum
from jaxreg._src.wire import Datum as Datum
from jaxreg._src.wire import WireError as WireError
from jaxreg._src.wire import decode_tensor as decode_tensor
from jaxreg._src.wire import encode_tensor as encode_tensor
from jaxreg._src.wire import to_datum as to_datum

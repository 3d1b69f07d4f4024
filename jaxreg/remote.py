"""Remote training: clients for a training service and ``forward_backward_custom``.

See [`forward_backward_custom`][jaxreg.remote.forward_backward_custom] for how a composed
objective is linearised into the service's cross-entropy loss,
[`TrainingClientLike`][jaxreg.remote.TrainingClientLike] for the interface it needs of a
training client, and [`ServiceClient`][jaxreg.remote.ServiceClient] and
[`RetryPolicy`][jaxreg.remote.RetryPolicy] for the transport.
"""

from jaxreg._src.core.guards import NonFiniteError as NonFiniteError
from jaxreg._src.core.guards import check_finite as check_finite
from jaxreg._src.remote.client import APIFuture as APIFuture
from jaxreg._src.remote.client import ServiceClient as ServiceClient
from jaxreg._src.remote.client import TrainingClient as TrainingClient
from jaxreg._src.remote.custom import forward_backward_custom as forward_backward_custom
from jaxreg._src.remote.custom import forward_backward_custom_async as forward_backward_custom_async
from jaxreg._src.remote.futures import CustomFuture as CustomFuture
from jaxreg._src.remote.futures import CustomResult as CustomResult
from jaxreg._src.remote.param_diagnostics import ParamDiagnostics as ParamDiagnostics
from jaxreg._src.remote.param_diagnostics import (
    UnsupportedExtensionError as UnsupportedExtensionError,
)
from jaxreg._src.remote.protocol import ResultFuture as ResultFuture
from jaxreg._src.remote.protocol import SupportsSkipSeq as SupportsSkipSeq
from jaxreg._src.remote.protocol import TrainingClientLike as TrainingClientLike
from jaxreg._src.remote.tinker import TinkerTrainingClient as TinkerTrainingClient
from jaxreg._src.remote.tinker import to_tinker_datum as to_tinker_datum
from jaxreg._src.remote.transport import RemoteError as RemoteError
from jaxreg._src.remote.transport import RetryPolicy as RetryPolicy
from jaxreg._src.remote.wire import Datum as Datum
from jaxreg._src.remote.wire import WireError as WireError
from jaxreg._src.remote.wire import decode_tensor as decode_tensor
from jaxreg._src.remote.wire import encode_tensor as encode_tensor
from jaxreg._src.remote.wire import to_datum as to_datum

__all__ = [
    "APIFuture",
    "CustomFuture",
    "CustomResult",
    "Datum",
    "NonFiniteError",
    "ParamDiagnostics",
    "RemoteError",
    "ResultFuture",
    "RetryPolicy",
    "ServiceClient",
    "SupportsSkipSeq",
    "TinkerTrainingClient",
    "TrainingClient",
    "TrainingClientLike",
    "UnsupportedExtensionError",
    "WireError",
    "check_finite",
    "decode_tensor",
    "encode_tensor",
    "forward_backward_custom",
    "forward_backward_custom_async",
    "to_datum",
    "to_tinker_datum",
]

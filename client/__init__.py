"""`sparrow.client`: call a Sparrow Triton server over gRPC, sync or asyncio, streaming. Imports no torch
(`pip install 'sparrow-trt[client]'`)."""

from .api import (Answer, AsyncSparrowClient, Connection, Health, RetryPolicy, SparrowClient, SparrowInvalidRequest,
                  SparrowServerError, SparrowTimeout, SparrowUnavailable)

__all__ = ["Answer", "AsyncSparrowClient", "Connection", "Health", "RetryPolicy", "SparrowClient",
           "SparrowInvalidRequest", "SparrowServerError", "SparrowTimeout", "SparrowUnavailable"]

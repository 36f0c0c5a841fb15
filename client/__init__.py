"""`sparrow.client`: call a Sparrow Triton server over gRPC. Imports no torch (`pip install 'sparrow-trt[client]'`)."""

from .api import Answer, SparrowClient, SparrowServerError

__all__ = ["Answer", "SparrowClient", "SparrowServerError"]

"""The worker SDK: write handlers, ``app.run()`` serves them to an ingress."""
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.worker.app import AnyServe
from anyserve_tw.worker.model import InferInput, InferRequest, InferResponse, TensorSpec

__all__ = ["AnyServe", "InferenceError", "InferInput", "InferRequest", "InferResponse", "TensorSpec"]

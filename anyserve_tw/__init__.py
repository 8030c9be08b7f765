"""AnyServe: KServe v2 gRPC model serving with Python workers, on Twisted.

The ingress (``twistd anyserve``) lives in :mod:`anyserve_tw.ingress.tap`; model
authors only need :class:`anyserve_tw.worker.AnyServe` (and ``InferResponse``,
``InferenceError``), re-exported here
lazily so that importing the package stays cheap for twistd.
"""

__version__ = "0.1.0"
__all__ = ["AnyServe", "InferenceError", "InferResponse", "__version__"]


def __getattr__(name):
    if name in ("AnyServe", "InferResponse"):
        from anyserve_tw import worker

        return getattr(worker, name)
    if name == "InferenceError":
        from anyserve_tw.wire.errors import InferenceError

        return InferenceError
    raise AttributeError(name)

"""AnyServe: KServe v2 gRPC model serving with Python workers, on Twisted.

The ingress (``twistd anyserve``) lives in :mod:`anyserve_tw.ingress.tap`; model
authors only need :class:`anyserve_tw.worker.AnyServe`, re-exported here
lazily so that importing the package stays cheap for twistd.
"""

__version__ = "0.1.0"
__all__ = ["AnyServe", "__version__"]


def __getattr__(name):
    if name == "AnyServe":
        from anyserve_tw.worker import AnyServe

        return AnyServe
    raise AttributeError(name)

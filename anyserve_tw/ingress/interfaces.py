"""The ways the ingress serves gRPC, as one interface.

:mod:`anyserve_tw.ingress.aiofront` serves from the reactor's own asyncio loop
(one thread; the default); :mod:`anyserve_tw.ingress.threadfront` from a
grpcio thread pool bridged into the reactor (the design card's shape, and the
only choice under a reactor that is not asyncio's);
:mod:`anyserve_tw.ingress.h2front` with our own HTTP/2 protocol on the
reactor, without grpc's server (the inference port only).
"""
from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import Attribute, Interface

#: The fronts, by their ``--front`` name.
FRONTS = ("aio", "threads", "h2")


class IGrpcFront(Interface):
    """A Twisted service serving reactor-side APIs over gRPC on one port.

    An API (:class:`~anyserve_tw.ingress.inference.InferenceAPI`,
    :class:`~anyserve_tw.ingress.management.ManagementAPI`) has a
    ``service_name``, ``raw_methods``, ``reactor_free`` methods and
    ``default_timeout(method)``; each method is called on the reactor thread
    as ``method(request, timeout)`` and returns a response, a Deferred of one,
    or raises ``InferenceError``.  The front bounds the call by the RPC's
    deadline (or the default timeout), cancels it when the client goes away,
    and turns failures into gRPC statuses.
    """

    label = Attribute("Name used in log lines (``inference``, ``management``).")
    bound_port = Attribute("The port listened on once started (None before).")

    def startService():
        """Bind the port (failing at once if it can't) and start serving."""

    def stopService():
        """Refuse new RPCs (UNAVAILABLE), let those in flight finish within the
        grace period; a Deferred that fires when the server has stopped."""


class GrpcFrontService(Service):
    """What both fronts keep: where they listen, their handlers and limits;
    subclasses create and stop the server."""

    log = Logger()

    def __init__(self, label, host, port, handlers, max_message_size, max_concurrent_rpcs, grace,
                 credentials=None, interceptors=()):
        self.label = label
        self.host = host
        self.port = port
        self.handlers = handlers
        self.max_message_size = max_message_size
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.grace = grace
        #: grpc.ServerCredentials for TLS, None for plain TCP.
        self.credentials = credentials
        #: Server interceptors of this front's kind (sync or aio), e.g. authentication.
        self.interceptors = list(interceptors)
        self.server = None
        self.bound_port = None

    def log_draining(self):
        self.log.info("{label} gRPC draining (grace {grace}s)", label=self.label, grace=self.grace)

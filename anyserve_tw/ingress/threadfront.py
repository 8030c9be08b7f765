"""The thread front: a grpcio thread-pool server bridged into the reactor.

The design card's shape, kept as ``--front threads`` and used whenever the
reactor is not asyncio's.  Each RPC holds one of ``threads`` threads while it
waits for the reactor (:mod:`anyserve_tw.ingress.bridge`), so ``threads``
bounds the RPCs in flight.

The server is created in ``startService``, never earlier: grpc objects do not
survive a fork, and twistd may daemonize between ``makeService`` and
``startService``.  ``stopService`` stops taking new RPCs at once (new ones get
UNAVAILABLE from grpc), lets in-flight ones finish for ``grace`` seconds, and
waits for that off the reactor thread, so the reactor keeps serving the
forwarded requests those RPCs are waiting on.
"""
import queue
import threading
import time
from concurrent import futures

import grpc
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from anyserve_tw.ingress.interfaces import GrpcFrontService, IGrpcFront
from anyserve_tw.wire import defaults, rpc
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.rpc import channel_options


def threaded_servicer(api, bridge):
    """An object with one ``Method(request, context)`` per RPC of ``api``,
    run in gRPC threads: each hops to the reactor through ``bridge``, bounded
    by the RPC's deadline, and aborts the RPC with the failure's status."""
    servicer = type("ThreadedServicer", (), {})()
    streams = getattr(api, "stream_methods", ())
    for name in rpc.method_names(api.service_name, api):
        method = getattr(api, name)
        default = api.default_timeout(name)
        if name in streams:
            setattr(servicer, name, _stream_via_reactor(bridge, method, default))
        elif name in api.reactor_free:
            setattr(servicer, name, _in_thread(method, default))
        else:
            setattr(servicer, name, _via_reactor(bridge, method, default))
    return servicer


def _in_thread(method, default):
    def handle(request, context):
        try:
            return method(request, rpc.time_left(context, default))
        except InferenceError as e:
            context.abort(e.code, e.message)
    return handle


def _via_reactor(bridge, method, default):
    def handle(request, context):
        timeout = rpc.time_left(context, default)
        return bridge.call_for_rpc(context, timeout, method, request, timeout)
    return handle


#: How long a stream's reader thread waits before looking again whether
#: its stream has room for another request.
STREAM_BACKOFF = 0.01


def _stream_via_reactor(bridge, method, default):
    """A bidirectional stream served from gRPC threads: ``method(send,
    timeout)`` opens it on the reactor; this RPC's thread yields what it
    sends, and one more thread reads the client's requests into it, since a
    blocking iterator cannot be read and written from one thread."""
    def handle(request_iterator, context):
        reactor = bridge.reactor
        sent = queue.SimpleQueue()
        timeout = rpc.time_left(context, default)
        stream = bridge.call(bridge.grace + 5, method, sent.put, timeout)

        def feed():
            try:
                for request in request_iterator:
                    while stream.full(sent.qsize()):  # a client sending, not reading
                        time.sleep(STREAM_BACKOFF)
                    reactor.callFromThread(stream.request, request)
            except Exception:
                return  # the RPC ended: cancel() below or the client's half-close
            reactor.callFromThread(stream.half_close)

        def ended():
            reactor.callFromThread(stream.cancel)
            sent.put(None)

        if not context.add_callback(ended):
            ended()  # the client left while the stream was opening
        threading.Thread(target=feed, name="anyserve-stream-reader", daemon=True).start()
        while True:
            response = sent.get()
            if response is None:
                return
            yield response
    return handle


def build_server(handlers, threads=defaults.DEFAULT_FRONT_THREADS, max_message_size=defaults.MAX_MESSAGE_SIZE,
                 max_concurrent_rpcs=defaults.DEFAULT_MAX_CONCURRENT_RPCS, label=""):
    """A grpcio thread-pool server, not yet bound or started: one thread per
    RPC in flight, the message caps both ways, no port sharing."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=label),
        handlers=handlers,
        options=channel_options(max_message_size) + [("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )


@implementer(IGrpcFront)
class GrpcServerService(GrpcFrontService):
    """Serves ``handlers`` on ``host:port`` from a pool of ``threads`` threads."""

    def __init__(self, reactor, label, host, port, handlers, threads=defaults.DEFAULT_FRONT_THREADS,
                 max_message_size=defaults.MAX_MESSAGE_SIZE, max_concurrent_rpcs=None, grace=10.0):
        super().__init__(label, host, port, handlers, max_message_size, max_concurrent_rpcs, grace)
        self.reactor = reactor
        self.threads = threads

    def startService(self):
        self.server = build_server(self.handlers, self.threads, self.max_message_size,
                                   self.max_concurrent_rpcs, self.label)
        self.bound_port = rpc.listen(self.server, self.label, self.host, self.port)
        self.server.start()
        super().startService()
        self.log.info("{label} gRPC listening on {host}:{port} (thread front, {threads} threads)",
                      label=self.label, host=self.host, port=self.bound_port, threads=self.threads)

    def stopService(self):
        super().stopService()
        if self.server is None:
            return None
        stopped = self.server.stop(self.grace)
        self.log_draining()
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), stopped.wait, self.grace + 5
        )

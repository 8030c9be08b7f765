"""The thread front: a grpcio thread-pool server bridged into the reactor.

The design card's shape, kept as ``--front threads`` and used whenever the
reactor is not asyncio's.  Each RPC holds one of ``threads`` threads while it
waits for the reactor (:mod:`anyserve_tw.ingress.bridge`), so ``threads``
bounds the RPCs in flight.

A sync grpcio server cannot wait for the reactor without holding its thread
(its handlers must return the response, and there is no way to hand the call
back later), so a slow model would take every thread and time out health
probes and every other model.  :class:`InferenceBudget` answers that by
admission: ModelInfer and ModelStreamInfer may hold at most ``threads -
reserved_threads(threads)`` threads, so health, metadata and the other RPCs
always find one; and one model's ModelInfer calls at most half of those, so
other models do too.  A call past either bound gets RESOURCE_EXHAUSTED at
once, in the thread that would have waited, so queued calls drain in
microseconds instead of waiting behind the slow ones.  Two slow models can
still fill the inference share between them: then a third gets
RESOURCE_EXHAUSTED, an answer, never a hang.

Responses handed to gRPC and not yet read by their client are counted per
connection and capped, and a call whose responses go unread is cancelled
(:mod:`anyserve_tw.ingress.backpressure`), which frees its thread too.

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

from anyserve_tw.ingress.backpressure import (
    COUNTED_METHODS, UNREAD_TIMEOUT, UnreadBytes, counted, keepalive_options,
)
from anyserve_tw.ingress.interfaces import GrpcFrontService, IGrpcFront
from anyserve_tw.wire import defaults, rpc
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.protowire import peek_request
from anyserve_tw.wire.rpc import channel_options


def threaded_servicer(api, bridge, unread=None):
    """An object with one ``Method(request, context)`` per RPC of ``api``,
    run in gRPC threads: each hops to the reactor through ``bridge``, bounded
    by the RPC's deadline, and aborts the RPC with the failure's status.
    The responses of ModelInfer and ModelStreamInfer are counted in
    ``unread`` (:class:`~anyserve_tw.ingress.backpressure.UnreadBytes`, one
    on the reactor's clock if None) until gRPC has delivered them."""
    servicer = type("ThreadedServicer", (), {})()
    streams = getattr(api, "stream_methods", ())
    names = rpc.method_names(api.service_name, api)
    if unread is None and set(COUNTED_METHODS) & set(names):
        unread = UnreadBytes(bridge.reactor)
    servicer.unread = unread
    for name in names:
        method = getattr(api, name)
        default = api.default_timeout(name)
        counted = unread if name in COUNTED_METHODS else None
        if name in streams:
            setattr(servicer, name, _stream_via_reactor(bridge, method, default, counted))
        elif name in api.reactor_free:
            setattr(servicer, name, _in_thread(method, default))
        else:
            setattr(servicer, name, _via_reactor(bridge, method, default, counted))
    return servicer


def _in_thread(method, default):
    def handle(request, context):
        try:
            return method(request, rpc.time_left(context, default))
        except InferenceError as e:
            context.abort(e.code, e.message)
    return handle


def _admit(unread, context):
    """The client's peer, once :meth:`UnreadBytes.admit` let it in (else the RPC is aborted)."""
    peer = context.peer()
    try:
        unread.admit(peer)
    except InferenceError as e:
        context.abort(e.code, e.message)
    return peer


def _via_reactor(bridge, method, default, unread=None):
    def handle(request, context):
        if unread is not None:
            peer = _admit(unread, context)
        timeout = rpc.time_left(context, default)
        result = bridge.call_for_rpc(context, timeout, method, request, timeout)
        if unread is not None and isinstance(result, bytes):
            # Held by gRPC until delivered; cancelling the call frees it.
            hold = unread.open(peer, context.cancel)
            try:
                unread.take(hold, len(result))
            except InferenceError as e:
                context.abort(e.code, e.message)
            if not context.add_callback(lambda: unread.close(hold)):
                unread.close(hold)
        return result
    return handle


#: How long a stream's reader thread waits before looking again whether
#: its stream has room for another request.
STREAM_BACKOFF = 0.01


def _stream_via_reactor(bridge, method, default, unread=None):
    """A bidirectional stream served from gRPC threads: ``method(send,
    timeout)`` opens it on the reactor; this RPC's thread yields what it
    sends, and one more thread reads the client's requests into it, since a
    blocking iterator cannot be read and written from one thread.  What
    waits in the queue or in gRPC counts in ``unread``; past its cap the
    stream ends with RESOURCE_EXHAUSTED, and the sweep cancels it when
    nothing it sent has been read for a while."""
    def handle(request_iterator, context):
        reactor = bridge.reactor
        sent = queue.SimpleQueue()
        hold = None
        if unread is not None:
            hold = unread.open(_admit(unread, context), context.cancel)
            send = counted(unread, hold, sent.put)
        else:
            send = sent.put
        timeout = rpc.time_left(context, default)
        stream = bridge.call(bridge.grace + 5, method, send, timeout)

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
            if hold is not None:
                unread.close(hold)

        if not context.add_callback(ended):
            ended()  # the client left while the stream was opening
        threading.Thread(target=feed, name="anyserve-stream-reader", daemon=True).start()
        while True:
            response = sent.get()
            if response is None:
                return
            if isinstance(response, InferenceError):
                context.abort(response.code, response.message)
            yield response
            if hold is not None:
                unread.give(hold, len(response))
    return handle


#: The RPCs that wait on a model, and so may hold a thread for long.
INFERENCE_METHODS = ("ModelInfer", "ModelStreamInfer")

#: Threads kept for everything but :data:`INFERENCE_METHODS`: this many at
#: least, or one in :data:`RESERVED_SHARE` of the pool if that is more.
MIN_RESERVED_THREADS = 2
RESERVED_SHARE = 8


def reserved_threads(threads):
    """Threads of a pool of ``threads`` that inference calls may not take
    (always leaving them one)."""
    return max(0, min(threads - 1, max(MIN_RESERVED_THREADS, threads // RESERVED_SHARE)))


class InferenceBudget(grpc.ServerInterceptor):
    """Admission of inference calls to a pool of ``threads`` threads.

    At most ``total`` inference calls hold a thread at once, and at most
    ``per_model`` ModelInfer calls for one model name; past that a call is
    answered RESOURCE_EXHAUSTED at once.  Streams count towards ``total``
    only: their model is named per message.
    """

    def __init__(self, threads):
        self.threads = threads
        self.total = max(1, threads - reserved_threads(threads))
        self.per_model = max(1, self.total // 2)
        self.in_flight = 0
        self.by_model = {}
        self._lock = threading.Lock()

    def admit(self, model):
        """Take a thread for a call to ``model`` (None: a stream); False if none is left for it."""
        with self._lock:
            if self.in_flight >= self.total:
                return False
            if model is not None:
                held = self.by_model.get(model, 0)
                if held >= self.per_model:
                    return False
                self.by_model[model] = held + 1
            self.in_flight += 1
            return True

    def release(self, model):
        with self._lock:
            self.in_flight -= 1
            if model is not None:
                held = self.by_model.pop(model) - 1
                if held:
                    self.by_model[model] = held

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        method = details.method.rpartition("/")[2]
        if handler is None or method not in INFERENCE_METHODS:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._stream(handler.stream_stream))
        return handler

    def _refuse(self, context, model):
        what = "model %r" % (model[:64],) if model is not None else "streams"
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "too many inference requests in flight for %s on this ingress's %d threads "
                      "(thread front): retry later" % (what, self.threads))

    def _unary(self, behavior):
        def admitted(request, context):
            try:
                model = peek_request(request)[0] if isinstance(request, bytes) else request.model_name
            except InferenceError:
                model = ""  # malformed: the handler says so, counted as one model
            if not self.admit(model):
                self._refuse(context, model)
            try:
                return behavior(request, context)
            finally:
                self.release(model)
        return admitted

    def _stream(self, behavior):
        def admitted(request_iterator, context):
            if not self.admit(None):
                self._refuse(context, None)
            try:
                yield from behavior(request_iterator, context)
            finally:
                self.release(None)
        return admitted


def build_server(handlers, threads=defaults.DEFAULT_FRONT_THREADS, max_message_size=defaults.MAX_MESSAGE_SIZE,
                 max_concurrent_rpcs=defaults.DEFAULT_MAX_CONCURRENT_RPCS, label="", interceptors=(),
                 unread_timeout=UNREAD_TIMEOUT):
    """A grpcio thread-pool server, not yet bound or started: one thread per
    RPC in flight, inference calls admitted by an :class:`InferenceBudget`,
    the message caps both ways, keepalive within ``unread_timeout``, no
    port sharing."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=label),
        handlers=handlers,
        interceptors=[*interceptors, InferenceBudget(threads)],
        options=channel_options(max_message_size) + keepalive_options(unread_timeout)
        + [("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )


@implementer(IGrpcFront)
class GrpcServerService(GrpcFrontService):
    """Serves ``handlers`` on ``host:port`` from a pool of ``threads``
    threads; a client that answers no ping for about ``unread_timeout``
    seconds is disconnected."""

    def __init__(self, reactor, label, host, port, handlers, threads=defaults.DEFAULT_FRONT_THREADS,
                 max_message_size=defaults.MAX_MESSAGE_SIZE, max_concurrent_rpcs=None, grace=10.0,
                 credentials=None, interceptors=(), unread_timeout=UNREAD_TIMEOUT):
        super().__init__(label, host, port, handlers, max_message_size, max_concurrent_rpcs, grace,
                         credentials, interceptors)
        self.reactor = reactor
        self.threads = threads
        self.unread_timeout = unread_timeout

    def startService(self):
        self.server = build_server(self.handlers, self.threads, self.max_message_size,
                                   self.max_concurrent_rpcs, self.label, self.interceptors, self.unread_timeout)
        self.bound_port = rpc.listen(self.server, self.label, self.host, self.port, self.credentials)
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

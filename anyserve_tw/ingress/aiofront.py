"""The default front: grpc.aio served on the reactor's own asyncio loop.

Twisted's asyncio reactor runs on an asyncio event loop; grpc.aio serves on
the same loop, so an RPC's coroutine calls the router directly and awaits its
Deferred: no thread per RPC, no hop between threads.  (On the 2-core
development machine, 16 small requests in flight: the ingress spent 691 us
of CPU per request on the thread front, 388 us on this one.)  Nothing holds a thread
while a model is slow, so ServerLive and other models keep answering however
many requests wait on one model; ``--max-concurrent-rpcs`` is what bounds them.

Responses handed to grpc.aio and not yet read by their client are counted
per connection and capped (:mod:`anyserve_tw.ingress.backpressure`).

The server is created in ``startService`` (grpc objects do not survive a fork;
twistd may daemonize after ``makeService``), binds its port there at once so a
busy port stops twistd, and starts serving as soon as the loop runs.
"""
import asyncio

import grpc
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from anyserve_tw.ingress.backpressure import (
    COUNTED_METHODS, UNREAD_TIMEOUT, UnreadBytes, counted, keepalive_options,
)
from anyserve_tw.ingress.interfaces import GrpcFrontService, IGrpcFront
from anyserve_tw.wire import defaults, rpc
from anyserve_tw.wire.errors import InferenceError, as_inference_error


class RequestTimeouts:
    """Bounds the requests whose client set no deadline, by one sweep every
    ``interval`` seconds instead of a timer per request.

    A client's own deadline needs nothing here: grpc.aio cancels the RPC's
    task when it passes, and :func:`settle` turns that into a cancel of the
    forwarded request.  Requests without one are bounded by the front's
    default (``--request-timeout``), to within ``interval``.
    """

    def __init__(self, clock, interval=1.0):
        self.clock = clock
        self.interval = interval
        self._waiting = {}  # asyncio future -> (Deferred, expiry)
        self._sweeper = None

    def __len__(self):
        return len(self._waiting)

    def start(self):
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(self.interval, now=False)

    def stop(self):
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()

    def watch(self, future, d, timeout):
        self._waiting[future] = (d, self.clock.seconds() + timeout)

    def forget(self, future):
        self._waiting.pop(future, None)

    def sweep(self):
        """Fail every watched request past its expiry with DEADLINE_EXCEEDED
        and cancel it (which tells its worker)."""
        now = self.clock.seconds()
        expired = [(f, d) for f, (d, expiry) in self._waiting.items() if expiry <= now]
        for future, d in expired:
            del self._waiting[future]
            if not future.done():
                future.set_result(Failure(TimeoutError("deadline exceeded")))
            d.cancel()


async def settle(d, timeouts=None, timeout=None):
    """The result of Deferred ``d``; raises :class:`InferenceError` for a
    failure.  Cancelling the awaiting task (the client went away, or its
    deadline passed) cancels ``d``, which tells the worker to drop the
    request.  With ``timeouts``, ``d`` is also bounded by ``timeout`` seconds
    (DEADLINE_EXCEEDED)."""
    future = asyncio.get_running_loop().create_future()

    def done(result):
        if not future.done():
            future.set_result(result)

    d.addBoth(done)
    if timeouts is not None and not future.done():
        timeouts.watch(future, d, timeout)
    try:
        result = await future  # already done when d had fired: no trip round the loop
    except asyncio.CancelledError:
        d.cancel()
        raise
    finally:
        if timeouts is not None:
            timeouts.forget(future)
    if isinstance(result, Failure):
        raise as_inference_error(result)
    return result


def aio_servicer(api, timeouts, unread=None):
    """An object with one coroutine ``Method(request, context)`` per RPC of
    ``api``, for a grpc.aio server on the reactor's loop; requests without a
    client deadline are bounded through ``timeouts``.  The responses of
    ModelInfer and ModelStreamInfer are counted in ``unread``
    (:class:`~anyserve_tw.ingress.backpressure.UnreadBytes`, one on the
    timeouts' clock if None) until gRPC has delivered them."""
    servicer = type("AioServicer", (), {})()
    streams = getattr(api, "stream_methods", ())
    names = rpc.method_names(api.service_name, api)
    if unread is None and timeouts is not None and set(COUNTED_METHODS) & set(names):
        unread = UnreadBytes(timeouts.clock)
    servicer.unread = unread
    for name in names:
        make = _stream if name in streams else _coroutine
        counted = unread if name in COUNTED_METHODS else None
        setattr(servicer, name, make(getattr(api, name), api.default_timeout(name), timeouts, counted))
    return servicer


#: How long a stream's reader waits before looking again whether its
#: stream has room for another request.
STREAM_BACKOFF = 0.01


def _stream(method, default, timeouts, unread=None):
    """A bidirectional stream: ``method(send, timeout)`` opens it on the
    reactor (which runs this loop); a task feeds it the client's requests
    while this generator yields what it sends.  The task stops reading
    while the stream is full (:meth:`InferStream.full`).  What waits in
    the queue or in gRPC counts in ``unread``; past its cap the stream ends
    with RESOURCE_EXHAUSTED, and the sweep cancels it when nothing it sent
    has been read for a while."""
    async def handle(request_iterator, context):
        sent = asyncio.Queue()
        hold = None
        if unread is not None:
            peer = context.peer()  # never after the RPC ended: grpc.aio crashes
            try:
                unread.admit(peer)
            except InferenceError as e:
                await context.abort(e.code, e.message)
            hold = unread.open(peer, asyncio.current_task().cancel)
            send = counted(unread, hold, sent.put_nowait)
        else:
            send = sent.put_nowait
        stream = method(send, rpc.time_left(context, default))

        async def feed():
            async for request in request_iterator:
                while stream.full(sent.qsize()):  # rare: a client sending, not reading
                    await asyncio.sleep(STREAM_BACKOFF)
                stream.request(request)
            stream.half_close()

        feeding = asyncio.ensure_future(feed())

        def ended(_=None):
            feeding.cancel()
            stream.cancel()
            if hold is not None:
                unread.close(hold)

        # A task cancelled while gRPC writes leaves this generator suspended
        # at its yield, to be closed whenever it is collected: end at once.
        context.add_done_callback(ended)
        try:
            while True:
                response = await sent.get()
                if response is None:
                    break
                if isinstance(response, InferenceError):
                    await context.abort(response.code, response.message)
                yield response
                if hold is not None:
                    unread.give(hold, len(response))
        finally:
            ended()
    return handle


def _coroutine(method, default, timeouts, unread=None):
    async def handle(request, context):
        try:
            if unread is not None:
                peer = context.peer()  # never after the RPC ended: grpc.aio crashes
                unread.admit(peer)
            timeout = rpc.time_left(context, None)
            if timeout is not None:
                result = method(request, timeout)
                if isinstance(result, Deferred):  # grpc.aio cancels this task at the deadline
                    result = await settle(result)
            else:
                result = method(request, default)
                if isinstance(result, Deferred):
                    result = await settle(result, timeouts, default)
            if unread is not None and isinstance(result, bytes):
                # Held by gRPC until delivered; grpc.aio cannot cancel one
                # call, so no sweep: keepalive ends a client that reads nothing.
                hold = unread.open(peer)
                unread.take(hold, len(result))
                context.add_done_callback(lambda _: unread.close(hold))
            return result
        except InferenceError as e:
            error = e
        except Exception:
            error = as_inference_error(Failure())  # logged; INTERNAL, as on the thread front
        await context.abort(error.code, error.message)
    return handle


@implementer(IGrpcFront)
class AioGrpcService(GrpcFrontService):
    """Serves ``handlers`` on ``host:port`` with grpc.aio on ``loop``, the
    asyncio loop the reactor runs on.  A client that answers no ping for
    about ``unread_timeout`` seconds is disconnected
    (:func:`~anyserve_tw.ingress.backpressure.keepalive_options`)."""

    def __init__(self, loop, label, host, port, handlers, timeouts=None,
                 max_message_size=defaults.MAX_MESSAGE_SIZE, max_concurrent_rpcs=None, grace=10.0,
                 credentials=None, interceptors=(), unread_timeout=UNREAD_TIMEOUT):
        super().__init__(label, host, port, handlers, max_message_size, max_concurrent_rpcs, grace,
                         credentials, interceptors)
        self.loop = loop
        self.timeouts = timeouts
        self.unread_timeout = unread_timeout
        #: Fires once the server serves; fails if it could not start.
        self.started = None

    def startService(self):
        asyncio.set_event_loop(self.loop)  # where grpc.aio looks for its loop
        self.server = grpc.aio.server(
            handlers=self.handlers,
            interceptors=self.interceptors,
            options=rpc.channel_options(self.max_message_size) + keepalive_options(self.unread_timeout)
            + [("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
        )
        self.bound_port = rpc.listen(self.server, self.label, self.host, self.port, self.credentials)
        self.started = Deferred.fromFuture(asyncio.ensure_future(self.server.start(), loop=self.loop))
        self.started.addErrback(lambda f: self.log.failure("{label} gRPC did not start", f, label=self.label))
        if self.timeouts is not None:
            self.timeouts.start()
        super().startService()
        self.log.info("{label} gRPC listening on {host}:{port} (asyncio front)",
                      label=self.label, host=self.host, port=self.bound_port)

    def stopService(self):
        super().stopService()
        if self.server is None:
            return None
        self.log_draining()
        stopped = Deferred.fromFuture(asyncio.ensure_future(self.server.stop(self.grace), loop=self.loop))
        if self.timeouts is not None:
            stopped.addBoth(lambda result: self.timeouts.stop() or result)
        return stopped

"""The default front: grpc.aio served on the reactor's own asyncio loop.

Twisted's asyncio reactor runs on an asyncio event loop; grpc.aio serves on
the same loop, so an RPC's coroutine calls the router directly and awaits its
Deferred: no thread per RPC, no hop between threads.  (On the 2-core
development machine, 16 small requests in flight: the ingress spent 691 us
of CPU per request on the thread front, 388 us on this one.)  Nothing holds a thread
while a model is slow, so ServerLive and other models keep answering however
many requests wait on one model; ``--max-concurrent-rpcs`` is what bounds them.

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


def aio_servicer(api, timeouts):
    """An object with one coroutine ``Method(request, context)`` per RPC of
    ``api``, for a grpc.aio server on the reactor's loop; requests without a
    client deadline are bounded through ``timeouts``."""
    servicer = type("AioServicer", (), {})()
    streams = getattr(api, "stream_methods", ())
    for name in rpc.method_names(api.service_name, api):
        make = _stream if name in streams else _coroutine
        setattr(servicer, name, make(getattr(api, name), api.default_timeout(name), timeouts))
    return servicer


#: How long a stream's reader waits before looking again whether its
#: stream has room for another request.
STREAM_BACKOFF = 0.01


def _stream(method, default, timeouts):
    """A bidirectional stream: ``method(send, timeout)`` opens it on the
    reactor (which runs this loop); a task feeds it the client's requests
    while this generator yields what it sends.  The task stops reading
    while the stream is full (:meth:`InferStream.full`)."""
    async def handle(request_iterator, context):
        sent = asyncio.Queue()
        stream = method(sent.put_nowait, rpc.time_left(context, default))

        async def feed():
            async for request in request_iterator:
                while stream.full(sent.qsize()):  # rare: a client sending, not reading
                    await asyncio.sleep(STREAM_BACKOFF)
                stream.request(request)
            stream.half_close()

        feeding = asyncio.ensure_future(feed())
        try:
            while True:
                response = await sent.get()
                if response is None:
                    break
                yield response
        finally:
            feeding.cancel()
            stream.cancel()
    return handle


def _coroutine(method, default, timeouts):
    async def handle(request, context):
        timeout = rpc.time_left(context, None)
        try:
            if timeout is not None:
                result = method(request, timeout)
                if isinstance(result, Deferred):  # grpc.aio cancels this task at the deadline
                    result = await settle(result)
            else:
                result = method(request, default)
                if isinstance(result, Deferred):
                    result = await settle(result, timeouts, default)
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
    asyncio loop the reactor runs on."""

    def __init__(self, loop, label, host, port, handlers, timeouts=None,
                 max_message_size=defaults.MAX_MESSAGE_SIZE, max_concurrent_rpcs=None, grace=10.0,
                 credentials=None, interceptors=()):
        super().__init__(label, host, port, handlers, max_message_size, max_concurrent_rpcs, grace,
                         credentials, interceptors)
        self.loop = loop
        self.timeouts = timeouts
        #: Fires once the server serves; fails if it could not start.
        self.started = None

    def startService(self):
        asyncio.set_event_loop(self.loop)  # where grpc.aio looks for its loop
        self.server = grpc.aio.server(
            handlers=self.handlers,
            interceptors=self.interceptors,
            options=rpc.channel_options(self.max_message_size) + [("grpc.so_reuseport", 0)],
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

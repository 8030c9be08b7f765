"""Calls from gRPC server threads into the reactor, bounded by the RPC's deadline.

grpcio runs each RPC in a thread of its own pool; the registry and the worker
connections live on the reactor thread.  Twisted's ``blockingCallFromThread``
does the hop but waits forever if the reactor never answers (or has stopped),
so this is the same hop with two bounds:

* on the reactor side the Deferred gets ``addTimeout(timeout, reactor)``: when
  the deadline passes it is cancelled (which sends CANCEL to the worker) and
  fails with DEADLINE_EXCEEDED;
* on the thread side the wait gives up ``grace`` seconds after that, in case
  the reactor itself is stuck.

When the client cancels the RPC, gRPC's done-callback cancels the Deferred too.
"""
import threading

import grpc
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure

from anyserve_tw.wire.errors import InferenceError, as_inference_error



def run_bounded(reactor, timeout, f, *args):
    """Reactor side: call ``f`` and bound its Deferred by ``timeout`` seconds."""
    d = maybeDeferred(f, *args)
    if timeout is not None:
        d.addTimeout(timeout, reactor)
    return d


class _Call:
    """One pending reactor call, owned by the gRPC thread waiting for it.

    A bare lock, held until the result is in, is the cheapest cross-thread
    signal CPython has: with 16 threads calling, a bridge call cost ~50 us of
    CPU this way against ~85 us with threading.Event.
    """

    __slots__ = ("lock", "result", "deferred", "finished")

    def __init__(self):
        self.lock = threading.Lock()
        self.lock.acquire()
        self.result = None
        self.deferred = None
        self.finished = False

    def finish(self, result):
        self.result = result
        self.finished = True
        self.lock.release()

    def wait(self, timeout):
        return self.lock.acquire(timeout=-1 if timeout is None else timeout)

    def cancel(self):
        if self.deferred is not None:
            self.deferred.cancel()


class ReactorBridge:
    """Runs Deferred-returning reactor code on behalf of gRPC threads."""

    def __init__(self, reactor, grace=1.0):
        self.reactor = reactor
        self.grace = grace

    def call(self, timeout, f, *args, context=None):
        """Run ``f(*args)`` on the reactor and return its result in this thread.

        Raises :class:`InferenceError` for any failure, DEADLINE_EXCEEDED when
        ``timeout`` (seconds, or None) passes.  ``context`` is the RPC's
        ``grpc.ServicerContext``: its cancellation cancels the call.
        """
        call = _Call()
        self.reactor.callFromThread(self._start, call, timeout, f, args)
        if context is not None and not context.add_callback(
            lambda: call.finished or self.reactor.callFromThread(call.cancel)
        ):
            # The RPC already ended (client gone, deadline passed in the queue).
            self.reactor.callFromThread(call.cancel)
        if not call.wait(None if timeout is None else timeout + self.grace):
            self.reactor.callFromThread(call.cancel)
            raise InferenceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (the ingress did not answer)"
            )
        if isinstance(call.result, Failure):
            raise as_inference_error(call.result)
        return call.result

    def call_for_rpc(self, context, timeout, f, *args):
        """:meth:`call` for a servicer: a failure ends the RPC with its status."""
        try:
            return self.call(timeout, f, *args, context=context)
        except InferenceError as e:
            context.abort(e.code, e.message)

    def _start(self, call, timeout, f, args):
        call.deferred = run_bounded(self.reactor, timeout, f, *args)
        call.deferred.addBoth(call.finish)

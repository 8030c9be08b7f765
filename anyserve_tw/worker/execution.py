"""How a request runs in the worker, from its bytes to the frame answering it.

Every request takes one path: parse and route on the event loop, then
decode, call and encode (:meth:`Model.serve`), in one of three places:

- on the loop, awaiting what the handler returns: ``asynchronous`` handlers;
- on the loop, inline: plain handlers whose recent run time is within
  ``inline_budget``.  The hop to a thread and back costs the worker about
  100 us of CPU per request, several times what a handler like ``add``
  takes, and queues it behind slow requests holding the pool's threads;
- in the thread pool: every other plain handler, so a slow model never
  stalls the loop that answers frames and sends heartbeats.

Cancelling a request (a CANCEL frame, the deadline in its REQUEST frame)
answers it at once and drops it if no thread has picked it up yet; a handler
already running finishes unheard.  :meth:`Execution.drain` waits for what
is in flight, threads included, for a bounded time.
"""
import functools
import inspect
import threading
import time
from collections import namedtuple

import grpc
from twisted.internet.defer import (
    CancelledError, Deferred, TimeoutError, ensureDeferred, fail, succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from anyserve_tw.wire import defaults, framing
from anyserve_tw.wire.errors import InferenceError, as_inference_error
from anyserve_tw.worker.model import handler_error
from anyserve_tw.worker.parsing import parse_request

log = Logger()

#: Longest recent run time (seconds) at which a plain handler runs inline.
INLINE_BUDGET = 200e-6

#: One inline run longer than this many budgets sends its model back to the
#: pool at once, whatever the average says: the loop (heartbeats, CANCELs,
#: other requests) is held by at most one such run.
OUTLIER_BUDGETS = 4

#: Larger requests always go to the pool: their run time is not what the
#: small requests taught the estimate, and tensors this size may be worth a
#: thread that releases the GIL.
INLINE_MAX_BYTES = 64 * 1024

#: Weight of the newest run time in a model's moving estimate.
ESTIMATE_WEIGHT = 0.25


class Answer(namedtuple("Answer", "kind payload code")):
    """The frame answering a request: RESPONSE bytes, or ERROR message and status code."""


def make_pool(threads):
    """The pool plain handlers run in; its threads are daemons, so a handler
    stuck past the shutdown grace cannot keep the process alive."""
    pool = ThreadPool(minthreads=1, maxthreads=threads, name="anyserve-model")
    pool.threadFactory = functools.partial(threading.Thread, daemon=True)
    return pool


class Execution:
    """Runs requests for an app's models; see the module docstring.

    ``reactor`` needs ``callLater`` and ``callFromThread``; ``pool`` is a
    ThreadPool (``start``, ``stop``, ``callInThreadWithCallback``); ``timer``
    measures handler run times.
    """

    def __init__(self, reactor, app, pool, max_payload=defaults.MAX_MESSAGE_SIZE,
                 inline_budget=INLINE_BUDGET, timer=time.perf_counter):
        self.reactor = reactor
        self.app = app
        self.pool = pool
        self.max_payload = max_payload
        self.inline_budget = inline_budget
        self.timer = timer
        #: Model -> moving estimate of its run time (seconds), from requests
        #: small enough to run inline.
        self.estimates = {}
        self._pending = 0  # requests not finished, pool threads included
        self._idle = []  # drain() Deferreds waiting for _pending == 0

    @property
    def pending(self):
        return self._pending

    def start(self):
        self.pool.start()

    def execute(self, payload, timeout=None):
        """A Deferred firing with the :class:`Answer` to request bytes.

        ``timeout`` (seconds) fails the request with DEADLINE_EXCEEDED;
        cancelling the Deferred answers CANCELLED.  Either way a handler no
        thread has started never runs.
        """
        d = self._run(payload)
        if timeout is not None and not d.called:
            d.addTimeout(timeout, self.reactor)
        return d.addBoth(self.answer)

    def answer(self, result):
        """The Answer for a response (bytes-like, or a list of parts) or a Failure."""
        if isinstance(result, Failure):
            e = as_inference_error(result)
            return Answer(framing.ERROR, e.message.encode("utf-8"), e.code.value[0])
        size = framing.payload_length(result)
        if size > self.max_payload:
            message = "response of %d bytes exceeds the %d-byte limit" % (size, self.max_payload)
            return Answer(framing.ERROR, message.encode("utf-8"),
                          grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        return Answer(framing.RESPONSE, result, 0)

    # -- where a request runs ------------------------------------------------

    def _run(self, payload):
        """A Deferred of the response (parts, as Model.serve gives them)."""
        try:
            parsed = parse_request(payload)
            model = self.app.route(parsed)
        except Exception:
            return fail()
        if model.asynchronous:
            return self._on_loop(model, parsed)
        if model.may_run_inline and len(payload) <= INLINE_MAX_BYTES:
            estimate = self.estimates.get(model)
            if estimate is not None and estimate <= self.inline_budget:
                return self._inline(model, parsed)
            return self._in_pool(model, parsed, timed=True)
        return self._in_pool(model, parsed, timed=False)

    def _observe(self, model, elapsed):
        previous = self.estimates.get(model)
        if previous is None or elapsed > OUTLIER_BUDGETS * self.inline_budget:
            self.estimates[model] = elapsed
        else:
            self.estimates[model] = previous + ESTIMATE_WEIGHT * (elapsed - previous)

    def _inline(self, model, parsed):
        started = self.timer()
        try:
            d = succeed(model.serve(parsed))
        except Exception:
            d = fail()
        self._observe(model, self.timer() - started)
        return d

    def _on_loop(self, model, parsed):
        """Call an asynchronous handler; wait for what it returns, if it must."""
        try:
            request = model.decode(parsed)
            result = model.call(request)
            if not isinstance(result, Deferred):
                if not inspect.isawaitable(result):
                    return succeed(model.respond(request, result))
                result = ensureDeferred(result)
        except Exception:
            return fail()

        def failed(failure):
            if failure.check(InferenceError, CancelledError, TimeoutError):
                return failure
            raise handler_error(model, failure.value)

        self._begin()
        result.addErrback(failed)
        result.addCallback(lambda value: model.respond(request, value))
        return result.addBoth(self._end)

    def _in_pool(self, model, parsed, timed):
        """Serve in a thread.  Cancelling fires the Deferred at once; the
        thread then skips the handler if it has not started it."""
        cancelled = []
        d = Deferred(lambda _: cancelled.append(True))
        timer = self.timer

        def work():
            if cancelled:
                return None
            started = timer()
            try:
                outcome = model.serve(parsed)
            except Exception:
                outcome = Failure()
            return outcome, timer() - started

        def done(succeeded, result):
            self._end()
            if not succeeded:  # work() itself failed, not the handler
                outcome = result
            elif result is None:
                return  # never started: d answered when it was cancelled
            else:
                outcome, elapsed = result
                if timed:
                    self._observe(model, elapsed)
            if not d.called:
                (d.errback if isinstance(outcome, Failure) else d.callback)(outcome)

        self._begin()
        self.pool.callInThreadWithCallback(
            lambda succeeded, result: self.reactor.callFromThread(done, succeeded, result), work)
        return d

    # -- drain ---------------------------------------------------------------

    def _begin(self):
        self._pending += 1

    def _end(self, result=None):
        self._pending -= 1
        if not self._pending and self._idle:
            # On the next turn: the last answer reaches its connection first.
            self.reactor.callLater(0, self._notify_idle)
        return result

    def _notify_idle(self):
        if self._pending:
            return
        idle, self._idle = self._idle, []
        for d in idle:
            if not d.called:
                d.callback(True)

    def drain(self, grace):
        """Fires True once nothing is in flight, or False after ``grace`` seconds."""
        if not self._pending:
            return succeed(True)
        d = Deferred()
        self._idle.append(d)
        return d.addTimeout(grace, self.reactor, onTimeoutCancel=lambda _result, _timeout: False)

    def stop(self, grace):
        """Drain, then stop the pool; after ``grace`` leave the stragglers'
        (daemon) threads behind rather than wait for them."""

        def drained(done):
            if done:
                self.pool.stop()
            else:
                log.warn("{count} request(s) still running after {grace}s: exiting without them",
                         count=self._pending, grace=grace)
            return done

        return self.drain(grace).addCallback(drained)

"""How a request runs in the worker, from its bytes to the frame answering it.

Every request takes one path: parse and route on the event loop, then
decode, call and encode (:meth:`Model.serve`), in one of three places:

- on the loop, awaiting what the handler returns: ``asynchronous`` handlers;
- on the loop, inline: plain handlers whose recent run time is within
  ``inline_budget``.  The hop to a thread and back costs the worker about
  100 us of CPU per request, several times what a handler like ``add``
  takes, and queues it behind slow requests holding the pool's threads;
- in the thread pool: every other plain handler, so a slow model never
  stalls the loop that answers frames and sends heartbeats.  Which model
  gets the next thread, each model's budget, and stuck threads are
  :mod:`anyserve_tw.worker.handlerthreads`' concern.

Cancelling a request (a CANCEL frame, the deadline in its REQUEST frame)
answers it at once and drops it if no thread has picked it up yet; a handler
already running finishes unheard, in a thread then counted as stuck.
:meth:`Execution.drain` waits, for a bounded time, for the requests still
owed an answer, not for handlers whose requests were given up.
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

from anyserve_tw.wire import defaults, framing, protos
from anyserve_tw.wire.errors import InferenceError, as_inference_error
from anyserve_tw.wire.payloads import Timing
from anyserve_tw.worker import restcodec
from anyserve_tw.worker.batching import Batcher
from anyserve_tw.worker.failurelog import FailureLog
from anyserve_tw.worker.handlerthreads import HandlerThreads
from anyserve_tw.worker.model import InferResponse, handler_error
from anyserve_tw.worker.parsing import parse_request
from anyserve_tw.worker.sharedmemory import SharedMemoryTable

_v2 = protos.inference

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

#: A decoupled handler in a thread gets this far ahead of the loop that
#: sends its responses, then waits for it.
MAX_UNSENT_RESPONSES = 16

#: How often (seconds) a handler waiting for the loop checks whether its
#: request was cancelled meanwhile.
ROOM_WAIT = 0.1

#: The response parameter naming the worker that answered.
SERVED_BY = "anyserve_worker"

#: Weight of the newest run time in a model's moving estimate.
ESTIMATE_WEIGHT = 0.25


class Answer(namedtuple("Answer", "kind payload code timing")):
    """The frame answering a request: RESPONSE bytes (``code``: the JSON
    length of a REST answer, else 0) with the worker's :class:`Timing`, or
    an ERROR message and status code."""

    def __new__(cls, kind, payload, code, timing=None):
        return super().__new__(cls, kind, payload, code, timing)


class Job:
    """One request's passage through the worker: what kind it came as, where
    its stream's responses go, and the times Triton's statistics want."""

    __slots__ = ("kind", "emit", "received", "times", "rest", "shared_memory", "batch_size")

    def __init__(self, kind, emit, received, shared_memory):
        self.kind = kind
        #: The shared-memory regions as the request's connection knows them.
        self.shared_memory = shared_memory
        #: ``emit(parts)`` sends one of a stream's responses (not the last).
        self.emit = emit
        self.received = received
        #: (queue, input, infer, output) seconds, once served.
        self.times = None
        #: What the REST codec needs to answer an HTTP_REQUEST.
        self.rest = None
        #: Requests its execution served (0: it rode along in another's batch).
        self.batch_size = 1

    def timing(self):
        if self.times is None:
            return None
        queue, decode, infer, encode = self.times
        return Timing(max(0, int(queue * 1e9)), int(decode * 1e9), int(infer * 1e9), int(encode * 1e9),
                      self.batch_size)


def error_answer(error):
    """The ERROR Answer for an InferenceError."""
    return Answer(framing.ERROR, error.message.encode("utf-8"), error.code.value[0])


def served_by(worker_id):
    """Serialized ``ModelInferResponse`` bytes holding only the parameter
    ``anyserve_worker``: appended to a response, they add it."""
    response = _v2.ModelInferResponse()
    response.parameters[SERVED_BY].string_param = worker_id
    return response.SerializeToString()


def final_response(request):
    """Triton's empty final response of a stream, flagged as the last."""
    response = _v2.ModelInferResponse(model_name=request.model_name,
                                      model_version=request.model_version, id=request.id)
    response.parameters["triton_final_response"].bool_param = True
    return response.SerializeToString()


def make_pool(threads):
    """The pool plain handlers run in; its threads are daemons, so a handler
    stuck past the shutdown grace cannot keep the process alive."""
    pool = ThreadPool(minthreads=1, maxthreads=threads, name="anyserve-model")
    pool.threadFactory = functools.partial(threading.Thread, daemon=True)
    return pool


class Execution:
    """Runs requests for an app's models; see the module docstring.

    ``reactor`` needs ``callLater``, ``seconds`` and ``callFromThread``;
    ``pool`` is a ThreadPool (``start``, ``stop``, ``callInThreadWithCallback``,
    ``adjustPoolsize``) whose ``max`` is the handlers' thread budget;
    ``max_stuck`` caps the stuck threads replaced (see
    :class:`~anyserve_tw.worker.handlerthreads.HandlerThreads`); ``timer``
    measures handler run times.
    """

    def __init__(self, reactor, app, pool, max_payload=defaults.MAX_MESSAGE_SIZE,
                 inline_budget=INLINE_BUDGET, timer=time.perf_counter, worker_id="", max_stuck=None):
        self.reactor = reactor
        #: Appended to every response: serialized protobuf concatenates, so
        #: these bytes add the ``anyserve_worker`` parameter (which worker
        #: answered) without re-encoding anything.
        self.signature = served_by(worker_id) if worker_id else b""
        #: The system shared-memory regions clients registered with the
        #: ingress (its SHM_TABLE frames keep it current).
        self.shared_memory = SharedMemoryTable()
        self.app = app
        self.pool = pool
        #: Hands the pool's threads to models' handlers.
        self.threads = HandlerThreads(reactor, pool, max_stuck=max_stuck,
                                      shared=lambda: len(app.models) > 1)
        #: Tracebacks of asynchronous and generator handlers, paced per
        #: model (plain handlers' are logged by Model.call).
        self.failures = FailureLog()
        self.max_payload = max_payload
        self.inline_budget = inline_budget
        self.timer = timer
        #: Model -> moving estimate of its run time (seconds), from requests
        #: small enough to run inline.
        self.estimates = {}
        #: Model -> its Batcher, for models that batch (max_batch_size > 0).
        self.batchers = {}
        self._pending = 0  # requests not finished, pool threads included
        self._idle = []  # drain() Deferreds waiting for _pending == 0

    @property
    def pending(self):
        return self._pending

    def start(self):
        self.pool.start()

    def healthy(self):
        """False while every handler thread is stuck in a handler whose
        request was given up: requests needing a thread are then refused
        with UNAVAILABLE, and the worker should be replaced."""
        return self.threads.healthy()

    def reason(self):
        """Why :meth:`healthy` is False ("" while it is True)."""
        return self.threads.reason()

    def execute(self, payload, timeout=None, kind=framing.REQUEST, emit=None, shared_memory=None):
        """A Deferred firing with the :class:`Answer` to a request of ``kind``
        (REQUEST, STREAM_REQUEST or HTTP_REQUEST, see
        :mod:`anyserve_tw.wire.framing`).  A decoupled model's responses but
        the last go to ``emit(parts)`` as they are produced.  Regions of
        shared memory are looked up in ``shared_memory`` (the view of the
        connection the request came on), else in :attr:`shared_memory`.

        ``timeout`` (seconds) fails the request with DEADLINE_EXCEEDED;
        cancelling the Deferred answers CANCELLED.  Either way a handler no
        thread has started never runs.
        """
        job = Job(kind, emit, self.timer(),
                  self.shared_memory if shared_memory is None else shared_memory)
        d = self._run(payload, job)
        if timeout is not None and not d.called:
            d.addTimeout(timeout, self.reactor)
        return d.addBoth(self.answer, job)

    def answer(self, result, job=None):
        """The Answer for a response (bytes-like, or a list of parts) or a Failure."""
        if isinstance(result, Failure):
            return error_answer(as_inference_error(result))
        code = 0
        result = self.signed(result)
        if job is not None and job.rest is not None:
            try:
                result, code = restcodec.http_response_from_infer(result, job.rest)
            except Exception:
                return error_answer(as_inference_error(Failure()))
        size = framing.payload_length(result)
        if size > self.max_payload:
            message = "response of %d bytes exceeds the %d-byte limit" % (size, self.max_payload)
            return error_answer(InferenceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message))
        return Answer(framing.RESPONSE, result, code, job.timing() if job is not None else None)

    def signed(self, parts):
        """Response parts with the ``anyserve_worker`` parameter added (not
        to an empty one: a stream's end, which the ingress sends nowhere)."""
        if self.signature:
            if isinstance(parts, list):
                parts.append(self.signature)
            elif len(parts):
                parts = [parts, self.signature]
        return parts

    # -- where a request runs ------------------------------------------------

    def _run(self, payload, job):
        """A Deferred of the response (parts, as Model.serve gives them)."""
        try:
            if job.kind == framing.HTTP_REQUEST:
                payload, job.rest = restcodec.parsed_request_from_http(payload)
            parsed = parse_request(payload)
            model = self.app.route(parsed)
            if model.decoupled:
                if job.kind != framing.STREAM_REQUEST:
                    raise InferenceError(
                        grpc.StatusCode.UNIMPLEMENTED,
                        "model '%s' is decoupled (it streams its responses): "
                        "call it with ModelStreamInfer" % model.name,
                    )
                return self._stream(model, parsed, job)
        except Exception:
            return fail()
        if model.max_batch_size:
            return self._batched(model, parsed, job)
        if model.asynchronous:
            return self._on_loop(model, parsed, job)
        if model.may_run_inline and len(payload) <= INLINE_MAX_BYTES:
            estimate = self.estimates.get(model)
            if estimate is not None and estimate <= self.inline_budget:
                return self._inline(model, parsed, job)
            return self._in_pool(model, parsed, job, timed=True)
        return self._in_pool(model, parsed, job, timed=False)

    def _serve(self, model, parsed, job):
        """Decode, call, encode, timing each step for the statistics."""
        timer = self.timer
        started = timer()
        request = model.decode(parsed, shared_memory=job.shared_memory)
        decoded = timer()
        result = model.call(request)
        called = timer()
        parts = model.respond(request, result)
        job.times = (started - job.received, decoded - started, called - decoded, timer() - called)
        return parts

    def _observe(self, model, elapsed):
        previous = self.estimates.get(model)
        if previous is None or elapsed > OUTLIER_BUDGETS * self.inline_budget:
            self.estimates[model] = elapsed
        else:
            self.estimates[model] = previous + ESTIMATE_WEIGHT * (elapsed - previous)

    def _inline(self, model, parsed, job):
        started = self.timer()
        try:
            d = succeed(self._serve(model, parsed, job))
        except Exception:
            d = fail()
        self._observe(model, self.timer() - started)
        return d

    def _on_loop(self, model, parsed, job):
        """Call an asynchronous handler; wait for what it returns, if it must."""
        timer = self.timer
        try:
            started = timer()
            request = model.decode(parsed, shared_memory=job.shared_memory)
            decoded = timer()
            result = model.call(request)
            if not isinstance(result, Deferred):
                if not inspect.isawaitable(result):
                    called = timer()
                    parts = model.respond(request, result)
                    job.times = (started - job.received, decoded - started, called - decoded, timer() - called)
                    return succeed(parts)
                result = ensureDeferred(result)
        except Exception:
            return fail()

        def failed(failure):
            if failure.check(InferenceError, CancelledError, TimeoutError):
                return failure
            self.failures.failure(model.name, failure)
            raise handler_error(model, failure.value)

        def respond(value):
            called = timer()
            parts = model.respond(request, value)
            job.times = (started - job.received, decoded - started, called - decoded, timer() - called)
            return parts

        self._begin()
        result.addErrback(failed)
        result.addCallback(respond)
        return result.addBoth(self._end)

    # -- batching models ---------------------------------------------------------

    def _batched(self, model, parsed, job):
        """Decode on the loop (a malformed request fails alone, before it
        joins a batch), then wait for a batch of the model's
        :class:`~anyserve_tw.worker.batching.Batcher`."""
        timer = self.timer
        started = timer()
        try:
            request = model.decode(parsed, shared_memory=job.shared_memory)
        except Exception:
            return fail()
        decoded = timer()
        batcher = self.batchers.get(model)
        if batcher is None:
            batcher = self.batchers[model] = Batcher(
                model, self.reactor, functools.partial(self._in_thread, model), timer=timer)

        def served(answer):
            job.times = (started - job.received + answer.queue, decoded - started,
                         answer.infer, answer.encode)
            job.batch_size = answer.batch_size
            return answer.parts

        self._begin()
        return batcher.submit(request).addCallback(served).addBoth(self._end)

    def _in_thread(self, model, work):
        """A Deferred of ``work()`` run in one of ``model``'s threads;
        cancelling it gives the work up (see HandlerThreads.cancel)."""
        tasks = []
        d = Deferred(lambda _: self.threads.cancel(tasks[0]))

        def done(succeeded, result):
            if d.called or (succeeded and result is None):
                return  # given up: d answered then
            (d.callback if succeeded else d.errback)(result)

        tasks.append(self.threads.submit(model, work, done))
        return d

    # -- decoupled models: several responses per request -----------------------

    def _stream(self, model, parsed, job):
        """Run a generator handler, sending each response it yields as it
        comes (Triton's decoupled models); the Deferred fires with the last
        frame's payload: empty, or Triton's empty final response when the
        client asked for it (``triton_enable_empty_final_response``)."""
        request = model.decode(parsed, shared_memory=job.shared_memory)
        flagged = bool(request.parameters.get("triton_enable_empty_final_response"))
        emit = job.emit
        timer = self.timer
        spent = [0.0, 0.0]  # in the handler, encoding

        def encode(result):
            if flagged:
                if not isinstance(result, InferResponse):
                    result = InferResponse(result)
                result.parameters = dict(result.parameters, triton_final_response=False)
            started = timer()
            parts = model.respond(request, result)
            spent[1] += timer() - started
            if framing.payload_length(parts) > self.max_payload:
                raise InferenceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     "a response of model '%s' exceeds the %d-byte limit"
                                     % (model.name, self.max_payload))
            return parts

        def last(_):
            job.times = (0.0, 0.0, spent[0], spent[1])
            return final_response(request) if flagged else b""

        if inspect.isasyncgenfunction(model.handler):
            async def run():
                generator = model.handler(request)
                try:
                    while True:
                        started = timer()
                        try:
                            result = await generator.__anext__()
                        except StopAsyncIteration:
                            break
                        except (InferenceError, CancelledError):
                            raise
                        except Exception as e:
                            self.failures.failure(model.name)
                            raise handler_error(model, e) from e
                        finally:
                            spent[0] += timer() - started
                        emit(self.signed(encode(result)))
                finally:
                    await generator.aclose()

            self._begin()
            return ensureDeferred(run()).addBoth(self._end).addCallback(last)

        cancelled = []
        reactor = self.reactor
        # Responses handed to the loop and not yet sent: a generator faster
        # than the loop waits here rather than flood it (heartbeats and
        # other requests go through that loop too).
        room = threading.Semaphore(MAX_UNSENT_RESPONSES)

        def work():
            generator = model.handler(request)
            try:
                while not cancelled:
                    started = timer()
                    try:
                        result = next(generator)
                    except StopIteration:
                        return True
                    except InferenceError:
                        raise
                    except Exception as e:
                        self.failures.failure(model.name)
                        raise handler_error(model, e) from e
                    finally:
                        spent[0] += timer() - started
                    parts = self.signed(encode(result))
                    while not room.acquire(timeout=ROOM_WAIT):
                        if cancelled:
                            return None
                    reactor.callFromThread(emit_unless_done, parts)
            finally:
                generator.close()

        def emit_unless_done(parts):
            room.release()
            if not d.called:
                emit(parts)

        def done(succeeded, result):
            self._end()
            if succeeded and result is None:
                return  # given up before or while it ran: d answered then
            if not d.called:
                if succeeded:
                    d.callback(None)
                else:
                    d.errback(result)

        tasks = []

        def cancel(_):
            cancelled.append(True)
            self.threads.cancel(tasks[0])

        d = Deferred(cancel)
        self._begin()
        tasks.append(self.threads.submit(model, work, done))
        return d.addCallback(last)

    def _in_pool(self, model, parsed, job, timed):
        """Serve in a thread.  Cancelling fires the Deferred at once; the
        thread then skips the handler if it has not started it."""
        timer = self.timer

        def work():
            started = timer()
            try:
                outcome = self._serve(model, parsed, job)
            except Exception:
                outcome = Failure()
            return outcome, timer() - started

        def done(succeeded, result):
            self._end()
            if not succeeded:  # work() itself failed, not the handler
                outcome = result
            elif result is None:
                return  # given up before or while it ran: d answered then
            else:
                outcome, elapsed = result
                if timed:
                    self._observe(model, elapsed)
            if not d.called:
                (d.errback if isinstance(outcome, Failure) else d.callback)(outcome)

        tasks = []
        d = Deferred(lambda _: self.threads.cancel(tasks[0]))
        self._begin()
        tasks.append(self.threads.submit(model, work, done))
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
        """Fires True once no request is owed an answer, or False after
        ``grace`` seconds.  Handlers whose requests were given up (stuck
        threads) are not waited for: nobody wants what they return."""
        if not self._pending:
            return succeed(True)
        d = Deferred()
        self._idle.append(d)
        return d.addTimeout(grace, self.reactor, onTimeoutCancel=lambda _result, _timeout: False)

    def stop(self, grace):
        """Drain, then stop the pool; after ``grace`` leave the stragglers'
        (daemon) threads behind rather than wait for them, and so for stuck
        threads at once (stopping the pool would join them)."""

        def drained(done):
            if done and not self.threads.occupied:
                self.pool.stop()
            elif done:
                log.warn("leaving {count} handler thread(s) whose requests were given up "
                         "still running", count=self.threads.occupied)
            else:
                log.warn("{count} request(s) still running after {grace}s: exiting without them",
                         count=self._pending, grace=grace)
            return done

        return self.drain(grace).addCallback(drained)

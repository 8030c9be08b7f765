"""Dynamic batching: one handler call for the requests of a model that
arrive together, as Triton's dynamic batcher does.

Models that cost milliseconds per call often cost little more per call for
32 rows than for one; a worker that runs each request alone leaves that
speed unused.  A :class:`Batcher` per batching model (``max_batch_size`` >
0) takes requests already decoded (so a malformed one fails alone, before
it joins anything) and gathers them:

- a batch runs once its rows reach ``max_batch_size`` or one of the
  ``preferred_batch_sizes`` (the largest reached), or as soon as no answer
  the model sent is still expected back, whichever comes first.  A batch
  that ends expects as many requests back as it answered: clients that keep
  requests in flight send the next one within about a round trip, and a
  batch that left without them would be small and followed by a large one,
  over and over (measured with MiniLM at 32 in flight: batches of 4 and 28
  in turn).  Each request that arrives meets one of those expectations;
  ``max_queue_delay`` after an instance became free, the rest are dropped.
  So a request reaching an idle model runs on the next turn of the loop,
  with whatever arrived together with it, and is not held for a queue
  delay as Triton's batcher holds it: at one request in flight that wait
  is pure latency (2 ms on a 15 ms model), and under load batches form
  anyway while an instance is busy;
- at most ``instances`` batches of a model run at once (Triton's instance
  count, 1 by default): while one runs, the next gathers, so under load
  batches grow even with no queue delay at all;
- only requests whose inputs can be joined share a batch: same input names,
  datatypes and shapes after the first (batch) dimension, and the same
  request parameters.  BYTES tensors join whatever their lengths (object
  arrays).  Others wait for a batch of their own kind, oldest first;
- a request cancelled (or past its deadline: the caller cancels it) while it
  waits leaves the queue, and one cancelled after its batch was formed but
  before the handler started is left out of it.  Once every request of a
  running batch is answered, the batch no longer counts against
  ``instances`` and its run is cancelled (its caller decides what that
  means for a thread already running the handler).

The joined request's inputs are the requests' inputs concatenated along the
first dimension (a batch of one is handed over as it is, uncopied).  Each
output the handler returns must have one row per input row; each request
gets its rows back (views, not copies) and the response parameters, and is
encoded as its own response: its requested outputs, classification and
shared memory apply to it alone.
"""
import functools
import inspect
import time
from collections import namedtuple

import grpc
import numpy as np
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from anyserve_tw.wire.errors import InferenceError, brief, invalid_argument
from anyserve_tw.worker.model import InferInput, InferRequest, InferResponse, handler_error

log = Logger()


class Served(namedtuple("Served", "parts queue infer encode batch_size")):
    """One request's answer from its batch: its response ``parts``; seconds
    it waited for its batch to start (``queue``), the handler took for the
    whole batch (``infer``) and its own response took to encode
    (``encode``); ``batch_size``: how many requests the batch served, on the
    first request of the batch only (0 on the others), so that an execution
    is counted once in Triton's statistics."""


class _Entry:
    """A request waiting in, or served by, a batch."""

    __slots__ = ("request", "rows", "key", "arrived", "submitted", "deferred", "cancelled", "batch")

    def __init__(self, request, rows, key, arrived, submitted):
        self.request = request
        self.rows = rows
        self.key = key
        self.arrived = arrived  # clock seconds, for the queue delay
        self.submitted = submitted  # timer seconds, for the queue time
        self.deferred = None
        self.cancelled = False
        self.batch = None

    def answered(self):
        return self.cancelled or self.deferred.called


class _Batch:
    """Requests handed to the handler together."""

    __slots__ = ("entries", "run", "released")

    def __init__(self, entries):
        self.entries = entries
        self.run = None  # the Deferred of the handler's run
        self.released = False  # no longer counted against ``instances``


def _run_here(work):
    return maybeDeferred(work)


def signature(request, max_batch_size, model_name=""):
    """(rows, key) of a decoded request: how many rows it brings, and what
    another request must share to be joined with it.  INVALID_ARGUMENT for
    a request no batch can take."""
    rows = None
    tensors = []
    for name in sorted(request.inputs):
        tensor = request.inputs[name]
        shape = tuple(tensor.shape)
        if not shape:
            raise invalid_argument("input '%s' of model '%s' has no batch dimension: the model "
                                   "batches, so its inputs are [batch, ...]" % (brief(name), model_name))
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise invalid_argument("inputs of model '%s' must share their first (batch) dimension: "
                                   "'%s' has %d rows, another %d" % (model_name, brief(name), shape[0], rows))
        tensors.append((name, tensor.datatype, shape[1:]))
    if rows is None:
        rows = 1  # no inputs: one row's worth of work
    if rows < 1:
        raise invalid_argument("model '%s' got a batch of %d rows; it needs 1 to %d"
                               % (model_name, rows, max_batch_size))
    if rows > max_batch_size:
        raise invalid_argument("model '%s' got a batch of %d rows, more than its max_batch_size %d"
                               % (model_name, rows, max_batch_size))
    parameters = tuple(sorted(request.parameters.items())) if request.parameters else ()
    return rows, (tuple(tensors), parameters)


def join(requests):
    """One InferRequest of ``requests`` (which share a :func:`signature`
    key): inputs concatenated along the first dimension; outputs asked for:
    all if any request asks for all, else every one asked for."""
    if len(requests) == 1:
        return requests[0]
    first = requests[0]
    inputs = {}
    for name, tensor in first.inputs.items():
        array = np.concatenate([r.inputs[name].as_numpy() for r in requests])
        inputs[name] = InferInput(name, tensor.datatype, array.shape, tensor.parameters, array)
    requested = []
    if all(r.requested_outputs for r in requests):
        for r in requests:
            requested.extend(n for n in r.requested_outputs if n not in requested)
    return InferRequest(first.model_name, first.model_version, "", first.parameters, inputs,
                        requested)


def split(model, result, rows):
    """The handler's result for a batch, as one InferResponse per request
    (``rows``: each request's rows, in batch order); INTERNAL naming the
    output whose first dimension is not the batch's rows."""
    parameters, outputs = model._named_outputs(result)
    total = sum(rows)
    arrays = []
    for name, value in outputs:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if array.ndim == 0 or array.shape[0] != total:
            raise InferenceError(
                grpc.StatusCode.INTERNAL,
                "model '%s' returned output '%s' of shape %s for a batch of %d rows: its first "
                "dimension must be the batch's" % (model.name, name, list(array.shape), total))
        arrays.append((name, array))
    responses = []
    start = 0
    for count in rows:
        end = start + count
        responses.append(InferResponse({name: array[start:end] for name, array in arrays},
                                       dict(parameters)))
        start = end
    return responses


class Batcher:
    """Gathers one model's requests into batches; see the module docstring.

    ``clock`` (``callLater``, ``seconds``) times the queue delay; ``run(work)``
    runs ``work()`` (a plain handler's batch: join, call, split, encode)
    where plain handlers run, returning a Deferred of its result, which may
    be cancelled; ``asynchronous`` models run on the loop instead.
    ``timer`` measures the times in :class:`Served`.
    """

    def __init__(self, model, clock, run=_run_here, instances=1, timer=time.perf_counter):
        if model.max_batch_size < 1:
            raise ValueError("model %s does not batch (max_batch_size 0)" % model.name)
        self.model = model
        self.clock = clock
        self.run = run
        self.instances = instances
        self.timer = timer
        self.max_batch_size = model.max_batch_size
        self.preferred = tuple(sorted(model.preferred_batch_sizes, reverse=True))
        self.delay = model.max_queue_delay_us / 1e6
        #: Requests waiting, oldest first.
        self.queue = []
        #: Batches running (not released).
        self.running = 0
        self._soon = None  # IDelayedCall: look at the queue on the next turn
        self._due = None  # IDelayedCall: the wait for answers expected back runs out
        self._due_at = None  # the clock time it is set for
        self._freed_at = None  # clock time an instance last became free
        self._expected = 0  # answers sent whose senders have not come back

    def submit(self, request):
        """A Deferred firing with the :class:`Served` answer to ``request``
        (an InferRequest of this model), or failing with its own error or
        its batch's.  Cancel it to give the request up."""
        try:
            rows, key = signature(request, self.max_batch_size, self.model.name)
        except InferenceError:
            return fail()
        entry = _Entry(request, rows, key, self.clock.seconds(), self.timer())
        if self._expected:
            self._expected -= 1
        entry.deferred = Deferred(lambda _: self._cancelled(entry))
        self.queue.append(entry)
        # On the next turn, not now: requests that arrive together (several
        # frames read at once) are all queued by then.
        if self._soon is None:
            self._soon = self.clock.callLater(0, self._consider)
        return entry.deferred

    # -- gathering ----------------------------------------------------------------

    def _consider(self):
        """Run what is ready while instances are free; else wait for the
        answers expected back (or for a running batch to end)."""
        self._soon = None
        while self.queue and self.running < self.instances:
            entries = self._ready()
            if entries is None:
                break
            self._launch(entries)
        self._arm()

    def _ready(self):
        """The requests of the next batch if it is due to run, else None."""
        oldest = self.queue[0]
        key = oldest.key
        available = 0
        for entry in self.queue:
            if entry.key == key:
                available += entry.rows
                if available >= self.max_batch_size:
                    break
        if available >= self.max_batch_size or not self._expecting():
            target = self.max_batch_size
        else:
            target = next((size for size in self.preferred if size <= available), None)
            if target is None:
                return None
            if self.clock.seconds() >= oldest.arrived + self.delay - 1e-6:
                # The oldest has waited its delay already: the batch takes
                # every row it can, not just a preferred size.
                target = self.max_batch_size
        taken, rows = [], 0
        for entry in self.queue:
            if entry.key == key and rows + entry.rows <= target:
                taken.append(entry)
                rows += entry.rows
                if rows == target:
                    break
        return taken

    def _expecting(self):
        """Whether answers sent are still expected back: fewer requests
        arrived since an instance became free than its batches answered, and
        ``max_queue_delay`` has not passed since (a timer set for it may
        fire a rounding error early: hence the microsecond)."""
        if self._expected and self.clock.seconds() >= self._freed_at + self.delay - 1e-6:
            self._expected = 0
        return self._expected > 0

    def _arm(self):
        """Be called back when the wait for answers expected back ends, if
        requests wait and an instance is free to run them then (else the end
        of a batch calls)."""
        due = None
        if self.queue and self.running < self.instances and self._expected:
            due = self._freed_at + self.delay
        if self._due is not None:
            if self._due.active():
                if due == self._due_at:
                    return
                self._due.cancel()
            self._due = None
        if due is not None:
            self._due_at = due
            self._due = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._expired)

    def _expired(self):
        self._due = None
        self._consider()

    def _reconsider(self):
        if self._soon is None:
            self._soon = self.clock.callLater(0, self._consider)

    def _cancelled(self, entry):
        """A request given up: out of the queue, or out of its batch."""
        entry.cancelled = True
        batch = entry.batch
        if batch is None:
            self.queue.remove(entry)
            self._reconsider()
        elif not batch.released and all(e.answered() for e in batch.entries):
            self._release(batch)
            if batch.run is not None:
                batch.run.cancel()

    def _release(self, batch):
        batch.released = True
        self.running -= 1
        self._expected += sum(1 for e in batch.entries if not e.cancelled)
        self._freed_at = self.clock.seconds()
        self._reconsider()

    # -- running --------------------------------------------------------------------

    def _launch(self, entries):
        for entry in entries:
            self.queue.remove(entry)
        batch = _Batch(entries)
        for entry in entries:
            entry.batch = batch
        self.running += 1
        if self.model.asynchronous:
            d = self._on_loop(batch)
        else:
            d = self.run(functools.partial(self._work, batch))
        batch.run = d
        d.addBoth(self._finished, batch)

    def _live(self, batch):
        """The batch's requests not given up; the ones given up are left out."""
        return [e for e in batch.entries if not e.cancelled]

    def _work(self, batch):
        """A plain handler's batch, in a thread: [(entry, Served or Failure)]."""
        live = self._live(batch)
        if not live:
            return []
        timer = self.timer
        started = timer()
        try:
            result = self.model.call(join([e.request for e in live]))
        except Exception:
            return self._all(live, Failure())
        return self._respond(live, result, started, timer())

    def _on_loop(self, batch):
        """An asynchronous handler's batch: called on the loop, awaited."""
        live = self._live(batch)
        if not live:
            return succeed([])
        timer = self.timer
        started = timer()
        try:
            result = self.model.call(join([e.request for e in live]))
        except Exception:
            return succeed(self._all(live, Failure()))
        if isinstance(result, Deferred):
            d = result
        elif inspect.isawaitable(result):
            d = ensureDeferred(result)
        else:
            return succeed(self._respond(live, result, started, timer()))
        model = self.model

        def failed(failure):
            if not failure.check(InferenceError):
                log.failure("model {model} failed", failure, model=model.name)
                failure = Failure(handler_error(model, failure.value))
            return self._all(live, failure)

        return d.addCallbacks(lambda value: self._respond(live, value, started, timer()), failed)

    def _all(self, live, failure):
        return [(entry, failure) for entry in live]

    def _respond(self, live, result, started, called):
        """Split a batch's result and encode each request's response."""
        model = self.model
        try:
            responses = split(model, result, [e.rows for e in live])
        except InferenceError:
            return self._all(live, Failure())
        except Exception as e:
            log.failure("model {model} returned a result that can't be split", model=model.name)
            return self._all(live, Failure(handler_error(model, e)))
        timer = self.timer
        outcomes = []
        for index, (entry, response) in enumerate(zip(live, responses)):
            encoding = timer()
            try:
                parts = model.respond(entry.request, response)
            except Exception:
                outcomes.append((entry, Failure()))
                continue
            outcomes.append((entry, Served(parts, started - entry.submitted, called - started,
                                           timer() - encoding, len(live) if index == 0 else 0)))
        return outcomes

    def _finished(self, outcome, batch):
        """Back on the loop: answer each request, free the instance."""
        if not batch.released:
            self._release(batch)
        if isinstance(outcome, Failure):
            # The run itself failed or was cancelled: every request still
            # waiting for an answer gets that.
            outcome = self._all(self._live(batch), outcome)
        for entry, answer in outcome:
            if not entry.deferred.called:
                if isinstance(answer, Failure):
                    entry.deferred.errback(answer)
                else:
                    entry.deferred.callback(answer)
        return None

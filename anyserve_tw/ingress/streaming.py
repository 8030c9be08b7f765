"""ModelStreamInfer: one bidirectional stream of inference requests.

Each request on a stream is forwarded like a ModelInfer, as bytes the
ingress never parses, and may be answered by several responses (a decoupled
model: a handler that yields).  Responses go back in the order the workers
send them, each wrapped as a ``ModelStreamInferResponse`` around the worker's
bytes; a request that fails sends its error in ``error_message`` and the
stream carries on, as Triton's does.

:class:`InferStream` is the reactor side, shared by both fronts: the front
feeds it the client's requests and drains what it sends.
"""
from twisted.python.failure import Failure

from anyserve_tw.wire import framing, protos
from anyserve_tw.wire.errors import InferenceError, as_inference_error
from anyserve_tw.wire.protowire import peek_request, stream_response

#: Requests of one stream forwarded and not yet answered, past which the
#: front reads no more of the client's requests until one is answered: a
#: client that sends without reading cannot make the ingress hold its
#: answers without bound.
MAX_STREAM_INFLIGHT = 64

#: Responses waiting for the client to read them, past which the front
#: reads no more requests from it.
MAX_STREAM_QUEUED = 64


def stream_error(message, request_id=""):
    """A ModelStreamInferResponse carrying an error, and the failed request's
    id as Triton sets it, so a client with several requests in flight
    knows which one failed."""
    response = protos.inference.ModelStreamInferResponse(error_message=message)
    if request_id:
        response.infer_response.id = request_id
    return response.SerializeToString()


class InferStream:
    """One ModelStreamInfer RPC on the reactor thread.

    ``send(bytes)`` delivers a serialized ``ModelStreamInferResponse`` to the
    client; ``send(None)`` once ends the RPC, after the client has sent its
    last request (:meth:`half_close`) and every request has been answered.
    Each request is bounded by ``timeout`` seconds.
    """

    def __init__(self, router, clock, send, timeout):
        self.router = router
        self.clock = clock
        self.send = send
        self.timeout = timeout
        self._inflight = set()
        self._half_closed = False
        self._over = False

    @property
    def inflight(self):
        return len(self._inflight)

    def full(self, queued):
        """True while this stream may take no more requests: too many are
        unanswered, or ``queued`` responses wait for the client to read
        them.  The fronts then stop reading the client's requests, and
        HTTP/2 flow control holds the client back.  (Read from the thread
        front's reader thread too: a length, never a decision that must
        be exact.)"""
        return len(self._inflight) >= MAX_STREAM_INFLIGHT or queued >= MAX_STREAM_QUEUED

    def request(self, request_bytes):
        """Forward one request of the stream."""
        if self._over:
            return
        try:
            name, version, request_id = peek_request(request_bytes)
        except InferenceError as e:
            self.send(stream_error(e.message))
            return
        d = self.router.infer(name, version, request_bytes, self.timeout,
                              framing.STREAM_REQUEST, self._partial, request_id)
        if not d.called and self.timeout is not None:
            d.addTimeout(self.timeout, self.clock)
        self._inflight.add(d)
        d.addBoth(self._answered, d, request_id)

    def _partial(self, payload):
        if not self._over:
            self.send(stream_response(payload))

    def _answered(self, result, d, request_id):
        self._inflight.discard(d)
        if self._over:
            return None
        if isinstance(result, Failure):
            self.send(stream_error(as_inference_error(result).message, request_id))
        elif result:  # empty: a decoupled model's end, with nothing to send
            self.send(stream_response(result))
        if self._half_closed and not self._inflight:
            self._end()
        return None

    def half_close(self):
        """The client sent its last request: end once all are answered."""
        self._half_closed = True
        if not self._inflight and not self._over:
            self._end()

    def cancel(self):
        """The client went away (or the RPC ended): drop what is in flight,
        which tells the workers to stop."""
        self._over = True
        for d in list(self._inflight):
            d.cancel()

    def _end(self):
        self._over = True
        self.send(None)

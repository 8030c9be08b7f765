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

from anyserve_tw.wire import framing
from anyserve_tw.wire.errors import InferenceError, as_inference_error
from anyserve_tw.wire.protowire import peek_request, stream_error, stream_response


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
        d.addBoth(self._answered, d)

    def _partial(self, payload):
        if not self._over:
            self.send(stream_response(payload))

    def _answered(self, result, d):
        self._inflight.discard(d)
        if self._over:
            return None
        if isinstance(result, Failure):
            self.send(stream_error(as_inference_error(result).message))
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

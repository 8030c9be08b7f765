"""Tests for anyserve_tw.ingress.streaming.InferStream, on a fake clock with a
fake router."""
import grpc
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.streaming import MAX_STREAM_INFLIGHT, MAX_STREAM_QUEUED, InferStream
from anyserve_tw.wire import framing, protos
from anyserve_tw.wire.errors import InferenceError, not_found

_v2 = protos.inference


class FakeRouter:
    """Records each forwarded request; the test answers them by hand."""

    def __init__(self):
        self.calls = []

    def infer(self, name, version, payload, timeout=None, kind=framing.REQUEST,
              on_partial=None, request_id=""):
        if name == "missing":
            d = Deferred()
            d.errback(not_found(name))
            return d
        d = Deferred()
        self.calls.append((name, version, payload, timeout, kind, on_partial, request_id, d))
        return d


def request(model, request_id=""):
    return _v2.ModelInferRequest(model_name=model, id=request_id).SerializeToString()


def response(request_id):
    return _v2.ModelInferResponse(model_name="m", id=request_id).SerializeToString()


def read(sent):
    """The ModelStreamInferResponse messages sent, parsed (None: end)."""
    return [None if item is None else _v2.ModelStreamInferResponse.FromString(item) for item in sent]


class InferStreamTests(SynchronousTestCase):
    def setUp(self):
        self.router = FakeRouter()
        self.clock = Clock()
        self.sent = []
        self.stream = InferStream(self.router, self.clock, self.sent.append, timeout=5.0)

    def test_forwards_each_request_as_a_stream_request(self):
        self.stream.request(request("m", "r1"))
        self.stream.request(request("m", "r2"))
        self.assertEqual([(c[0], c[3], c[4], c[6]) for c in self.router.calls],
                         [("m", 5.0, framing.STREAM_REQUEST, "r1"), ("m", 5.0, framing.STREAM_REQUEST, "r2")])
        self.assertEqual(self.stream.inflight, 2)

    def test_partials_then_final_in_order_and_the_end_after_half_close(self):
        self.stream.request(request("m", "r1"))
        on_partial, d = self.router.calls[0][5], self.router.calls[0][7]
        on_partial(response("p1"))
        on_partial(response("p2"))
        self.stream.half_close()
        self.assertEqual(len(self.sent), 2)  # not ended: r1 is still open
        d.callback(b"")  # a decoupled model's end, with nothing more to send
        messages = read(self.sent)
        self.assertEqual([m.infer_response.id for m in messages[:2]], ["p1", "p2"])
        self.assertIsNone(messages[2])
        self.assertEqual(len(messages), 3)

    def test_errors_travel_in_the_stream_and_it_goes_on(self):
        self.stream.request(request("missing"))
        self.stream.request(b"\xff\xff\xff")  # not a protobuf message
        self.stream.request(request("m", "ok"))
        self.router.calls[0][7].callback(response("ok"))
        messages = read(self.sent)
        self.assertIn("unknown model", messages[0].error_message)
        self.assertIn("malformed", messages[1].error_message)
        self.assertEqual(messages[2].infer_response.id, "ok")
        self.assertEqual(messages[2].error_message, "")

    def test_worker_error_is_sent_as_message(self):
        self.stream.request(request("m"))
        self.router.calls[0][7].errback(InferenceError(grpc.StatusCode.INVALID_ARGUMENT, "bad n"))
        self.assertEqual(read(self.sent)[0].error_message, "bad n")

    def test_timeout_fails_the_request(self):
        self.stream.request(request("m"))
        d = self.router.calls[0][7]
        self.clock.advance(5.1)
        self.assertEqual(read(self.sent)[0].error_message, "deadline exceeded")
        self.assertTrue(d.called)

    def test_cancel_drops_everything_in_flight_quietly(self):
        self.stream.request(request("m"))
        self.stream.request(request("m"))
        self.stream.cancel()
        for call in self.router.calls:
            self.assertTrue(call[7].called)
        self.assertEqual(self.stream.inflight, 0)
        self.assertEqual(self.sent, [])
        self.stream.request(request("m"))  # after the end: ignored
        self.assertEqual(len(self.router.calls), 2)

    def test_half_close_with_nothing_in_flight_ends_at_once(self):
        self.stream.half_close()
        self.assertEqual(self.sent, [None])

    def test_full_when_too_many_unanswered_or_unread(self):
        for i in range(MAX_STREAM_INFLIGHT - 1):
            self.stream.request(request("m"))
        self.assertFalse(self.stream.full(0))
        self.assertTrue(self.stream.full(MAX_STREAM_QUEUED))
        self.stream.request(request("m"))
        self.assertTrue(self.stream.full(0))
        self.router.calls[0][7].callback(response("done"))
        self.assertFalse(self.stream.full(0))

    def test_errors_name_the_request_that_failed(self):
        self.stream.request(request("m", "r-9"))
        self.router.calls[0][7].errback(InferenceError(grpc.StatusCode.INTERNAL, "boom"))
        (message,) = read(self.sent)
        self.assertEqual((message.error_message, message.infer_response.id), ("boom", "r-9"))

"""Tests for anyserve_tw.ingress.h2front: gRPC calls driven through
:class:`GrpcH2Protocol` by an ``h2`` client connection over an in-memory
transport, with a fake clock (no sockets, no processes)."""
import struct

import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.aiofront import RequestTimeouts
from anyserve_tw.ingress.backpressure import UnreadBytes
from anyserve_tw.ingress.h2front import (
    MAX_HEADER_BLOCK, MAX_STREAMS, MAX_UNSENT, RECEIVE_WINDOW, SEND_BATCH, GrpcH2Protocol, H2GrpcService,
    Method,
    api_methods, grpc_message, health_methods, parse_timeout,
)
from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError

SERVICE = "/test.Fake/"


def message(payload, compressed=False):
    """``payload`` as one gRPC length-prefixed message."""
    return struct.pack(">BI", 1 if compressed else 0, len(payload)) + payload


class FakeAPI:
    """Raw-bytes methods answering at once, later (a Deferred the test
    fires), or with an InferenceError; it records what it was asked."""

    def __init__(self):
        self.requests = []
        self.pending = []  # Deferreds handed out by Later
        self.cancelled = 0
        self.streams = []

    def Echo(self, request, timeout):
        self.requests.append((request, timeout))
        return b"echo:" + request

    def Later(self, request, timeout):
        self.requests.append((request, timeout))
        d = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.pending.append(d)
        return d

    def Missing(self, request, timeout):
        raise InferenceError(grpc.StatusCode.NOT_FOUND, "no model %r" % request.decode())

    def Big(self, request, timeout):
        return b"x" * int(request)

    def Chat(self, send, timeout):
        stream = FakeStream(send)
        self.streams.append(stream)
        return stream

    def methods(self):
        unary = {name: Method(name, getattr(self, name), None, None, False, 30.0, counted=True)
                 for name in ("Echo", "Later", "Missing", "Big")}
        unary["Chat"] = Method("Chat", self.Chat, None, None, True, 30.0, counted=True)
        return {SERVICE + name: method for name, method in unary.items()}


class FakeStream:
    """A stream as the front opens one: records requests, answers none itself."""

    def __init__(self, send):
        self.send = send
        self.requests = []
        self.half_closed = False
        self.cancelled = False
        self.is_full = False

    def request(self, request):
        self.requests.append(request)

    def half_close(self):
        self.half_closed = True

    def full(self, queued):
        return self.is_full

    def cancel(self):
        self.cancelled = True


class Response:
    """What the client saw on one stream."""

    def __init__(self):
        self.headers = None
        self.data = b""
        self.trailers = None
        self.ended = False
        self.reset = None
        self.data_after_trailers = False

    @property
    def status(self):
        return None if self.trailers is None else int(self.trailers[b"grpc-status"])

    @property
    def details(self):
        return None if self.trailers is None else self.trailers.get(b"grpc-message", b"").decode()

    def messages(self):
        out, data = [], self.data
        while data:
            flag, length = struct.unpack_from(">BI", data)
            out.append(data[5:5 + length])
            data = data[5 + length:]
        return out


class H2TestCase(SynchronousTestCase):
    max_message_size = 1000
    max_concurrent_rpcs = None
    window = None  # the client's initial stream window, in its SETTINGS (None: h2's 65,535)

    def setUp(self):
        self.clock = Clock()
        self.api = FakeAPI()
        self.timeouts = RequestTimeouts(self.clock)
        self.timeouts.start()
        self.addCleanup(self.timeouts.stop)
        self.unread = UnreadBytes(self.clock)
        self.front = H2GrpcService(self.clock, "inference", "127.0.0.1", 0, self.api.methods(),
                                   self.timeouts, max_message_size=self.max_message_size,
                                   max_concurrent_rpcs=self.max_concurrent_rpcs, unread=self.unread)
        self.transport = StringTransport()
        self.protocol = GrpcH2Protocol(self.front)
        self.protocol.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if self.window is not None:
            self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        self.responses = {}
        self.pump()

    def pump(self):
        """Carry bytes both ways until neither side has more to say."""
        for _ in range(1000):
            out = self.client.data_to_send()
            if out:
                self.protocol.dataReceived(out)
            back = self.transport.value()
            self.transport.clear()
            if back:
                for event in self.client.receive_data(back):
                    self.event(event)
            if not out and not back:
                return
        self.fail("the connection never went quiet")

    def event(self, event):
        response = self.responses.get(getattr(event, "stream_id", None))
        if response is None:
            return
        if isinstance(event, ResponseReceived):
            response.headers = dict(event.headers)
        elif isinstance(event, DataReceived):
            if response.trailers is not None:
                response.data_after_trailers = True
            response.data += event.data
        elif isinstance(event, TrailersReceived):
            response.trailers = dict(event.headers)
        elif isinstance(event, StreamEnded):
            response.ended = True
            if response.trailers is None and response.headers is not None:
                # A trailers-only answer: the status is in the headers.
                response.trailers = response.headers
        elif isinstance(event, StreamReset):
            response.reset = event.error_code

    def open(self, name, headers=(), path=None):
        """Open a call to ``name``; the headers are sent, no data yet."""
        stream_id = self.client.get_next_available_stream_id()
        self.responses[stream_id] = Response()
        self.client.send_headers(stream_id, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path or (SERVICE + name).encode()),
            (b":authority", b"test"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        ] + list(headers))
        return stream_id

    def call(self, name, payload=b"", headers=(), path=None, compressed=False):
        """A unary call, sent whole; its stream id."""
        stream_id = self.open(name, headers, path)
        self.client.send_data(stream_id, message(payload, compressed), end_stream=True)
        self.pump()
        return stream_id


class LargeMessageTests(H2TestCase):
    """Requests in many DATA frames, answers larger than a frame: the front
    joins frames and writes batches of frames itself, and the windows on
    both sides stay as h2 would keep them (the client's h2 checks every
    frame it receives against its size limit and its windows)."""
    max_message_size = 1 << 20
    window = 1 << 20

    def setUp(self):
        super().setUp()
        self.client.increment_flow_control_window(self.window)  # the connection's, as the stream's
        self.pump()
        self.events = []
        data = self.protocol._data
        self.protocol._data = lambda event: (self.events.append(len(event.data)), data(event))

    def assert_windows_agree(self, expected):
        """The server's h2 counts the connection window as the client does."""
        self.assertEqual(self.client.outbound_flow_control_window, expected)
        self.assertEqual(self.protocol.conn.inbound_flow_control_window, expected)

    def send_in_frames(self, stream_id, payload, frame=16384, **kwargs):
        body = message(payload)
        for start in range(0, len(body), frame):
            self.client.send_data(stream_id, body[start:start + frame],
                                  end_stream=start + frame >= len(body), **kwargs)

    def test_frames_of_one_read_are_one_event(self):
        """Seven 16 KiB frames in one read reach the call as one piece, and
        the connection window given back is what they used."""
        window = self.client.outbound_flow_control_window
        payload = bytes(range(256)) * 400
        sid = self.open("Echo")
        self.send_in_frames(sid, payload)
        self.pump()
        self.assertEqual(self.api.requests, [(payload, 30.0)])
        self.assertEqual(self.events, [len(payload) + 5])
        self.assertEqual(self.responses[sid].messages(), [b"echo:" + payload])
        self.assert_windows_agree(window - len(payload) - 5)

    def test_padded_frames_are_left_to_h2(self):
        """Padded frames are not joined: h2 takes the padding off each."""
        window = self.client.outbound_flow_control_window
        payload = b"p" * 40000
        sid = self.open("Echo")
        self.send_in_frames(sid, payload, pad_length=7)
        self.pump()
        self.assertEqual(self.api.requests, [(payload, 30.0)])
        self.assertEqual(len(self.events), 3)
        self.assert_windows_agree(window - len(payload) - 5 - 3 * 8)

    def test_frames_of_two_streams(self):
        """Frames of two streams in one read: each call gets its own bytes."""
        first, second = self.open("Echo"), self.open("Echo")
        one, two = message(b"1" * 30000), message(b"2" * 30000)
        for start in range(0, len(one), 10000):
            last = start + 10000 >= len(one)
            self.client.send_data(first, one[start:start + 10000], end_stream=last)
            self.client.send_data(second, two[start:start + 10000], end_stream=last)
        self.pump()
        self.assertEqual(self.api.requests, [(b"1" * 30000, 30.0), (b"2" * 30000, 30.0)])
        self.assertEqual(self.responses[first].messages(), [b"echo:" + b"1" * 30000])
        self.assertEqual(self.responses[second].messages(), [b"echo:" + b"2" * 30000])

    def test_an_incomplete_frame_waits(self):
        """A run ends at a frame not wholly read; it is taken with the next read."""
        payload = b"q" * 50000
        sid = self.open("Echo")
        self.send_in_frames(sid, payload)
        data = self.client.data_to_send()
        self.protocol.dataReceived(data[:40000])
        self.protocol.dataReceived(data[40000:])
        self.pump()
        self.assertEqual(self.api.requests, [(payload, 30.0)])
        self.assertEqual(self.responses[sid].messages(), [b"echo:" + payload])

    def test_answer_in_frames_of_the_clients_size(self):
        """A 200,000-byte answer is written in one batch of 16 KiB frames (the
        client's largest), and the server's windows shrink by what it sent."""
        writes = []
        self.transport.writeSequence = lambda parts: (writes.append(len(parts)),
                                                      StringTransport.write(self.transport, b"".join(parts)))
        window = self.protocol.conn.outbound_flow_control_window
        sid = self.call("Big", b"200000")
        response = self.responses[sid]
        self.assertEqual(response.messages(), [b"x" * 200000])
        self.assertEqual(response.status, 0)
        self.assertEqual(self.protocol.conn.outbound_flow_control_window, window - 200005)
        self.assertGreaterEqual(max(writes), 2 * (200005 // 16384 + 1))  # header and body of each frame

    def test_pause_during_an_answer(self):
        """The transport pauses us after a batch: the rest waits for resume."""
        transport = self.transport
        protocol = self.protocol

        def pausing(parts):
            StringTransport.write(transport, b"".join(parts))
            protocol.pauseProducing()
        transport.writeSequence = pausing
        size = 3 * SEND_BATCH
        sid = self.call("Big", str(size).encode())
        response = self.responses[sid]
        self.assertGreater(len(response.data), 0)
        self.assertLessEqual(len(response.data), SEND_BATCH + 5)  # the prefix went first
        self.assertIsNone(response.trailers)
        transport.writeSequence = lambda parts: StringTransport.write(transport, b"".join(parts))
        protocol.resumeProducing()
        self.pump()
        self.assertEqual(response.messages(), [b"x" * size])
        self.assertEqual(response.status, 0)
        self.assertEqual(self.protocol.unread, 0)

    def test_large_answer_on_a_stream_h2_has_closed(self):
        """A large answer for a stream h2 has closed under a live call (as a
        reset or GOAWAY in the read being handled leaves it) is dropped: no
        frame is written, the windows are untouched, its unread bytes are
        given back and the call ends."""
        sid = self.open("Chat")
        self.pump()
        send = self.api.streams[0].send
        send(b"first")
        self.pump()
        self.assertEqual(self.responses[sid].messages(), [b"first"])
        self.protocol.conn.reset_stream(sid)
        self.protocol._flush()
        self.transport.clear()
        window = self.protocol.conn.outbound_flow_control_window
        send(b"y" * 200000)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.protocol.conn.outbound_flow_control_window, window)
        self.assertEqual(self.protocol.unread, 0)
        self.assertEqual(self.unread.total, 0)
        self.assertTrue(self.api.streams[0].cancelled)
        self.assertEqual((self.front.active, self.protocol.calls), (0, {}))


class UnaryTests(H2TestCase):
    def test_answer_and_ok_trailers(self):
        sid = self.call("Echo", b"hi")
        response = self.responses[sid]
        self.assertEqual(response.headers[b":status"], b"200")
        self.assertEqual(response.headers[b"content-type"], b"application/grpc")
        self.assertEqual(response.messages(), [b"echo:hi"])
        self.assertEqual(response.status, 0)
        self.assertTrue(response.ended)
        self.assertEqual(self.api.requests, [(b"hi", 30.0)])
        self.assertEqual(self.front.active, 0)

    def test_deferred_answer(self):
        """An answer that comes later is sent when its Deferred fires."""
        sid = self.call("Later", b"q")
        response = self.responses[sid]
        self.assertIsNone(response.trailers)
        self.assertEqual(response.data, b"")
        self.assertEqual(self.front.active, 1)
        self.api.pending[0].callback(b"done")
        self.pump()
        self.assertEqual(response.messages(), [b"done"])
        self.assertEqual(response.status, 0)
        self.assertEqual(self.front.active, 0)

    def test_deferred_failure(self):
        sid = self.call("Later", b"q")
        self.api.pending[0].errback(InferenceError(grpc.StatusCode.UNAVAILABLE, "gone away"))
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.UNAVAILABLE.value[0])
        self.assertEqual(self.responses[sid].details, "gone away")

    def test_inference_error(self):
        sid = self.call("Missing", b"m1")
        response = self.responses[sid]
        self.assertEqual(response.status, grpc.StatusCode.NOT_FOUND.value[0])
        self.assertEqual(response.details, "no model 'm1'")
        self.assertEqual(response.data, b"")

    def test_unknown_path(self):
        sid = self.call("Nope", b"")
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.UNIMPLEMENTED.value[0])
        self.assertIn("/test.Fake/Nope", self.responses[sid].details)
        self.assertEqual(self.api.requests, [])

    def headers_only(self, method, content_type):
        """A request of headers alone, to Echo; its response."""
        sid = self.client.get_next_available_stream_id()
        self.responses[sid] = Response()
        self.client.send_headers(sid, [(b":method", method), (b":scheme", b"http"),
                                       (b":path", b"/test.Fake/Echo"), (b":authority", b"t"),
                                       (b"content-type", content_type)], end_stream=True)
        self.pump()
        return self.responses[sid]

    def test_not_grpc(self):
        """A request that is not gRPC gets HTTP 415."""
        response = self.headers_only(b"POST", b"text/plain")
        self.assertEqual(response.headers[b":status"], b"415")
        self.assertEqual(self.api.requests, [])

    def test_missing_path(self):
        """No ``:path``: UNIMPLEMENTED, in a message h2 clients accept (it
        ends in a space, sent as %20), and the connection's other calls go on."""
        other = self.call("Later", b"1")
        self.client.config.validate_outbound_headers = False  # a client h2 would stop
        sid = self.client.get_next_available_stream_id()
        self.responses[sid] = Response()
        self.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                       (b":authority", b"t"), (b"content-type", b"application/grpc")],
                                 end_stream=True)
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.UNIMPLEMENTED.value[0])
        self.assertEqual(self.responses[sid].trailers[b"grpc-message"], b"Method not found:%20")
        self.api.pending[0].callback(b"one")
        self.pump()
        self.assertEqual(self.responses[other].messages(), [b"one"])

    def test_path_or_method_twice(self):
        """A request naming ``:path`` or ``:method`` twice is reset, not served."""
        self.client.config.validate_outbound_headers = False
        for twice in ([(b":path", b"/test.Fake/Echo"), (b":path", b"/test.Fake/Missing")],
                      [(b":path", b"/test.Fake/Echo"), (b":method", b"GET")]):
            sid = self.client.get_next_available_stream_id()
            self.responses[sid] = Response()
            self.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http")] + twice
                                     + [(b":authority", b"t"), (b"content-type", b"application/grpc")])
            self.client.send_data(sid, message(b"x"), end_stream=True)
            self.pump()
            self.assertEqual(self.responses[sid].reset, 1)  # PROTOCOL_ERROR
        self.assertEqual(self.api.requests, [])
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.responses[self.call("Echo", b"ok")].messages(), [b"echo:ok"])

    def test_not_post(self):
        """A request with another method than POST gets HTTP 405, and no call."""
        response = self.headers_only(b"GET", b"application/grpc")
        self.assertEqual(response.headers[b":status"], b"405")
        self.assertTrue(response.ended)
        self.assertEqual(self.api.requests, [])
        self.assertEqual(self.front.active, 0)

    def test_two_calls_on_one_connection(self):
        first = self.call("Later", b"1")
        second = self.call("Echo", b"2")
        self.assertEqual(self.responses[second].messages(), [b"echo:2"])
        self.assertIsNone(self.responses[first].trailers)
        self.api.pending[0].callback(b"one")
        self.pump()
        self.assertEqual(self.responses[first].messages(), [b"one"])

    def test_request_in_many_frames(self):
        payload = bytes(range(256)) * 3
        sid = self.open("Echo")
        data = message(payload)
        for i in range(0, len(data), 100):
            self.client.send_data(sid, data[i:i + 100], end_stream=i + 100 >= len(data))
            self.pump()
        self.assertEqual(self.responses[sid].messages(), [b"echo:" + payload])

    def test_two_messages_on_a_unary_call(self):
        sid = self.open("Echo")
        self.client.send_data(sid, message(b"a") + message(b"b"), end_stream=True)
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.UNIMPLEMENTED.value[0])
        self.assertEqual(self.api.requests, [])

    def test_no_message(self):
        sid = self.open("Echo")
        self.client.send_data(sid, b"\x00\x00", end_stream=True)
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.INTERNAL.value[0])
        self.assertEqual(self.api.requests, [])


class DeadlineTests(H2TestCase):
    def deadline_timers(self):
        return [c for c in self.clock.getDelayedCalls() if c.active() and c.func == self.protocol.fail]

    def test_grpc_timeout(self):
        """The client's deadline: DEADLINE_EXCEEDED on time, and the Deferred
        the API returned is cancelled (which tells the worker)."""
        sid = self.call("Later", b"q", headers=[(b"grpc-timeout", b"250m")])
        self.assertEqual(self.api.requests, [(b"q", 0.25)])
        self.clock.advance(0.2)
        self.pump()
        self.assertIsNone(self.responses[sid].trailers)
        self.assertEqual(self.api.cancelled, 0)
        self.clock.advance(0.1)
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        self.assertEqual(self.api.cancelled, 1)
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.deadline_timers(), [])

    def test_answer_in_time_cancels_the_timer(self):
        sid = self.call("Later", b"q", headers=[(b"grpc-timeout", b"1S")])
        self.api.pending[0].callback(b"ok")
        self.pump()
        self.assertEqual(self.responses[sid].status, 0)
        self.assertEqual(self.deadline_timers(), [])
        self.clock.advance(2)
        self.pump()
        self.assertEqual(self.api.cancelled, 0)
        self.assertEqual(self.responses[sid].messages(), [b"ok"])

    def test_no_grpc_timeout_is_bounded_by_the_default(self):
        """Without a client deadline the method's default (30 s here) holds,
        through the shared sweep."""
        sid = self.call("Later", b"q")
        self.assertEqual(self.api.requests, [(b"q", 30.0)])
        self.clock.advance(29)
        self.pump()
        self.assertIsNone(self.responses[sid].trailers)
        self.clock.advance(2)
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        self.assertEqual(self.api.cancelled, 1)
        self.assertEqual(len(self.timeouts), 0)

    def test_malformed_grpc_timeout(self):
        sid = self.call("Echo", b"q", headers=[(b"grpc-timeout", b"soon")])
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        self.assertEqual(self.api.requests, [])
        self.assertEqual(self.front.active, 0)


class CancelTests(H2TestCase):
    def test_client_reset_cancels(self):
        sid = self.call("Later", b"q")
        self.assertEqual(self.front.active, 1)
        self.client.reset_stream(sid)
        self.pump()
        self.assertEqual(self.api.cancelled, 1)
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.protocol.calls, {})
        self.assertEqual(len(self.timeouts), 0)

    def test_reset_before_the_request_ends(self):
        sid = self.open("Echo")
        self.client.send_data(sid, message(b"abc")[:4])
        self.pump()
        self.client.reset_stream(sid)
        self.pump()
        self.assertEqual(self.api.requests, [])
        self.assertEqual(self.front.active, 0)

    def test_connection_lost_cancels(self):
        self.call("Later", b"1")
        self.call("Later", b"2", headers=[(b"grpc-timeout", b"5S")])
        self.protocol.connectionLost(None)
        self.assertEqual(self.api.cancelled, 2)
        self.assertEqual(self.front.active, 0)
        self.assertNotIn(self.protocol, self.front.connections)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func == self.protocol.fail], [])


class LimitTests(H2TestCase):
    max_concurrent_rpcs = 2

    def test_message_over_max_size(self):
        sid = self.call("Echo", b"x" * 1001)
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        self.assertIn("1001 vs. 1000", self.responses[sid].details)
        self.assertEqual(self.api.requests, [])
        sid = self.call("Later", b"x" * 1000)  # at the cap: taken
        self.assertEqual(self.api.requests, [(b"x" * 1000, 30.0)])

    def test_oversize_message_refused_before_it_ends(self):
        """The cap is enforced as the bytes arrive, not once all are in."""
        sid = self.open("Echo")
        self.client.send_data(sid, message(b"x" * 3000)[:2000])
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        self.assertEqual(self.front.active, 0)

    def test_response_over_max_size(self):
        sid = self.call("Big", b"1001")
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        self.assertEqual(self.responses[sid].data, b"")

    def test_compressed_message(self):
        sid = self.call("Echo", b"zz", compressed=True)
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.UNIMPLEMENTED.value[0])
        self.assertEqual(self.api.requests, [])

    def test_max_concurrent_rpcs(self):
        self.call("Later", b"1")
        self.call("Later", b"2")
        third = self.call("Echo", b"3")
        self.assertEqual(self.responses[third].status, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        self.assertEqual(len(self.api.requests), 2)
        self.api.pending[0].callback(b"one")
        self.pump()
        fourth = self.call("Echo", b"4")
        self.assertEqual(self.responses[fourth].status, 0)

    def test_draining(self):
        self.front.draining = True
        sid = self.call("Echo", b"q")
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.UNAVAILABLE.value[0])
        self.assertEqual(self.api.requests, [])


class FlowControlTests(H2TestCase):
    max_message_size = 1 << 20

    def test_answer_larger_than_the_window(self):
        """A 200,000-byte answer: 65,535 bytes (the client's initial window)
        go at once; the rest as the client grants more; trailers after it all."""
        size = 200000
        sid = self.call("Big", str(size).encode())
        response = self.responses[sid]
        self.assertEqual(len(response.data), 65535)
        self.assertIsNone(response.trailers)
        self.assertEqual(self.protocol.unread, size + 5 - 65535)
        for _ in range(2):
            self.client.increment_flow_control_window(65535)
            self.client.increment_flow_control_window(65535, stream_id=sid)
            self.pump()
            self.assertIsNone(response.trailers)
        self.assertEqual(len(response.data), 3 * 65535)
        self.client.increment_flow_control_window(65535)
        self.client.increment_flow_control_window(65535, stream_id=sid)
        self.pump()
        self.assertEqual(response.messages(), [b"x" * size])
        self.assertEqual(response.status, 0)
        self.assertFalse(response.data_after_trailers)
        self.assertEqual(self.protocol.unread, 0)
        self.assertEqual(self.unread.total, 0)

    def test_pause_holds_data_until_resume(self):
        self.protocol.pauseProducing()
        sid = self.call("Big", b"50000")
        response = self.responses[sid]
        self.assertEqual(response.data, b"")
        self.assertIsNone(response.trailers)
        self.protocol.resumeProducing()
        self.pump()
        self.assertEqual(response.messages(), [b"x" * 50000])
        self.assertEqual(response.status, 0)

    def test_reset_while_waiting_for_the_window(self):
        """Unsent bytes of a call the client resets are released."""
        sid = self.call("Big", b"200000")
        self.assertGreater(self.unread.total, 0)
        self.client.reset_stream(sid)
        self.pump()
        self.assertEqual(self.protocol.unread, 0)
        self.assertEqual(self.unread.total, 0)
        self.assertEqual(self.protocol.calls, {})


class UnreadTests(H2TestCase):
    """The unread-bytes cap of a client that does not read its answers."""

    max_message_size = 1 << 20

    def setUp(self):
        super().setUp()
        self.unread.per_client = 100000

    def test_over_the_cap_is_resource_exhausted(self):
        """Two answers of 200,000 bytes wait unread: the first is counted
        (the client was under the cap), the second refused with
        RESOURCE_EXHAUSTED, and the connection carries on."""
        first = self.call("Later", b"1")
        second = self.call("Later", b"2")
        self.api.pending[0].callback(b"x" * 200000)
        self.pump()
        self.api.pending[1].callback(b"y" * 200000)
        self.pump()
        self.assertIsNone(self.responses[first].trailers)
        self.assertEqual(self.responses[second].status, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        self.assertEqual(self.front.active, 0)
        # The first answer's bytes wait for the client: its calls are refused.
        third = self.call("Echo", b"3")
        self.assertEqual(self.responses[third].status, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


class FakePort:
    stopped = False

    def stopListening(self):
        self.stopped = True


class DrainTests(H2TestCase):
    """stopService: new calls UNAVAILABLE, calls in flight finish, then
    each connection gets its GOAWAY and is closed."""

    max_message_size = 1 << 20

    def stop(self):
        self.front._listening = FakePort()
        self.front.running = True
        return self.front.stopService()

    def test_answer_in_flight_goes_out_before_the_goaway(self):
        first = self.call("Later", b"1")
        stopped = self.stop()
        self.assertNoResult(stopped)
        second = self.call("Echo", b"2")
        self.assertEqual(self.responses[second].status, grpc.StatusCode.UNAVAILABLE.value[0])
        self.api.pending[0].callback(b"done")
        self.pump()
        self.assertEqual(self.responses[first].messages(), [b"done"])
        self.assertEqual(self.responses[first].status, 0)
        self.assertTrue(self.transport.disconnecting)
        self.successResultOf(stopped)

    def test_answer_waiting_for_the_window_is_sent_before_closing(self):
        """An answer the client has not yet made room for is part of the
        drain: the connection stays until it is out (within the grace)."""
        sid = self.call("Big", b"200000")
        stopped = self.stop()
        self.pump()
        self.assertFalse(self.transport.disconnecting)
        self.assertNoResult(stopped)
        for _ in range(3):
            self.client.increment_flow_control_window(65535)
            self.client.increment_flow_control_window(65535, stream_id=sid)
            self.pump()
        self.assertEqual(self.responses[sid].messages(), [b"x" * 200000])
        self.assertEqual(self.responses[sid].status, 0)
        self.assertTrue(self.transport.disconnecting)
        self.successResultOf(stopped)

    def test_grace_ends_what_is_left(self):
        first = self.call("Later", b"1")
        stopped = self.stop()
        self.clock.advance(self.front.grace + 0.1)
        self.pump()
        self.assertEqual(self.responses[first].status, grpc.StatusCode.UNAVAILABLE.value[0])
        self.assertEqual(self.api.cancelled, 1)
        self.assertTrue(self.transport.disconnecting)
        self.successResultOf(stopped)


class StreamTests(H2TestCase):
    def test_messages_in_and_out(self):
        sid = self.open("Chat")
        self.client.send_data(sid, message(b"a") + message(b"bc")[:3])
        self.pump()
        stream = self.api.streams[0]
        self.assertEqual(stream.requests, [b"a"])
        self.client.send_data(sid, message(b"bc")[3:], end_stream=True)
        self.pump()
        self.assertEqual(stream.requests, [b"a", b"bc"])
        self.assertTrue(stream.half_closed)
        stream.send(b"r1")
        stream.send(b"r2")
        self.pump()
        self.assertEqual(self.responses[sid].messages(), [b"r1", b"r2"])
        self.assertIsNone(self.responses[sid].trailers)
        stream.send(None)
        self.pump()
        self.assertEqual(self.responses[sid].status, 0)
        self.assertEqual(self.front.active, 0)

    def test_error_ends_the_stream(self):
        sid = self.open("Chat")
        self.pump()
        self.api.streams[0].send(InferenceError(grpc.StatusCode.INTERNAL, "broke"))
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.INTERNAL.value[0])
        self.assertTrue(self.api.streams[0].cancelled)

    def test_reset_cancels_the_stream(self):
        sid = self.open("Chat")
        self.pump()
        self.client.reset_stream(sid)
        self.pump()
        self.assertTrue(self.api.streams[0].cancelled)
        self.assertEqual(self.front.active, 0)

    def test_full_stream_reads_no_more(self):
        """While its stream is full the front hands it no more requests (and
        holds the client back); once it has room the rest follow."""
        sid = self.open("Chat")
        self.pump()
        stream = self.api.streams[0]
        stream.is_full = True
        self.client.send_data(sid, message(b"1") + message(b"2"))
        self.pump()
        self.assertEqual(stream.requests, [])
        stream.is_full = False
        stream.send(b"answer")  # an answer: room again
        self.pump()
        self.assertEqual(stream.requests, [b"1", b"2"])


    def test_half_close_waits_for_the_held_requests(self):
        """A client that sends its last requests while its stream is full:
        the stream is told the client is done only once it has them all
        (else it would end, OK, without ever answering them)."""
        sid = self.open("Chat")
        self.pump()
        stream = self.api.streams[0]
        stream.is_full = True
        self.client.send_data(sid, message(b"1") + message(b"2"), end_stream=True)
        self.pump()
        self.assertEqual(stream.requests, [])
        self.assertFalse(stream.half_closed)
        stream.is_full = False
        stream.send(b"answer")
        self.pump()
        self.assertEqual(stream.requests, [b"1", b"2"])
        self.assertTrue(stream.half_closed)


    def test_room_without_an_answer(self):
        """Room can come without anything sent (a decoupled model's empty
        last response frees its slot silently): the front looks again, as
        the asyncio front's reader does every 10 ms."""
        sid = self.open("Chat")
        self.pump()
        stream = self.api.streams[0]
        stream.is_full = True
        self.client.send_data(sid, message(b"1"))
        self.pump()
        self.assertEqual(stream.requests, [])
        stream.is_full = False
        self.clock.advance(0.1)
        self.pump()
        self.assertEqual(stream.requests, [b"1"])


class StreamWindowTests(H2TestCase):
    """The bytes a full stream holds unread come back to the connection's
    window when the stream ends: else, once they add up to the window,
    no call on the connection can send a byte."""

    max_message_size = 16 << 20

    def send_all(self, sid, data):
        while data:
            size = min(len(data), self.client.max_outbound_frame_size,
                       self.client.local_flow_control_window(sid))
            self.assertGreater(size, 0, "the client has no window left to send")
            self.client.send_data(sid, data[:size])
            data = data[size:]
            self.pump()

    def fill(self):
        """A full stream holding the whole connection window."""
        sid = self.open("Chat")
        self.pump()
        self.api.streams[-1].is_full = True
        self.send_all(sid, message(b"x" * (RECEIVE_WINDOW // 4 - 5)) * 4)
        self.assertEqual(self.api.streams[-1].requests, [])
        self.assertEqual(self.client.outbound_flow_control_window, 0)
        return sid

    def assertConnectionServes(self):
        other = self.open("Later")
        self.send_all(other, message(b"y" * 1000))
        self.client.end_stream(other)
        self.pump()
        self.assertEqual(self.api.requests[-1][0], b"y" * 1000)

    def test_held_bytes_are_released_when_the_stream_fails(self):
        sid = self.fill()
        self.api.streams[-1].send(InferenceError(grpc.StatusCode.INTERNAL, "broke"))
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.INTERNAL.value[0])
        self.assertConnectionServes()

    def test_held_bytes_are_released_when_the_client_resets(self):
        sid = self.fill()
        self.client.reset_stream(sid)
        self.pump()
        self.assertTrue(self.api.streams[-1].cancelled)
        self.assertConnectionServes()


class HealthTests(H2TestCase):
    """gRPC's health service on this front: ReactorHealth through health_methods."""

    def setUp(self):
        super().setUp()
        from anyserve_tw.ingress.health import ReactorHealth
        self.health = ReactorHealth()
        self.front.methods.update(health_methods(self.health))

    def statuses(self, sid):
        from grpc_health.v1 import health_pb2
        return [health_pb2.HealthCheckResponse.FromString(m).status for m in self.responses[sid].messages()]

    def request(self, service):
        from grpc_health.v1 import health_pb2
        return health_pb2.HealthCheckRequest(service=service).SerializeToString()

    def test_check(self):
        from anyserve_tw.ingress.health import SERVING
        self.health.set("", SERVING)
        sid = self.call(None, self.request(""), path=b"/grpc.health.v1.Health/Check")
        self.assertEqual(self.statuses(sid), [SERVING])
        self.assertEqual(self.responses[sid].status, 0)
        sid = self.call(None, self.request("nope"), path=b"/grpc.health.v1.Health/Check")
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.NOT_FOUND.value[0])

    def test_watch(self):
        from anyserve_tw.ingress.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING
        sid = self.open(None, path=b"/grpc.health.v1.Health/Watch")
        self.client.send_data(sid, message(self.request("m")))
        self.pump()
        self.assertEqual(self.statuses(sid), [SERVICE_UNKNOWN])
        self.health.set("m", SERVING)
        self.pump()
        self.assertEqual(self.statuses(sid), [SERVICE_UNKNOWN, SERVING])
        self.health.shutdown()
        self.pump()
        self.assertEqual(self.statuses(sid), [SERVICE_UNKNOWN, SERVING, NOT_SERVING])
        self.assertEqual(self.responses[sid].status, 0)
        self.assertEqual(self.front.active, 0)

    def test_watch_reset(self):
        from anyserve_tw.ingress.health import SERVING
        sid = self.open(None, path=b"/grpc.health.v1.Health/Watch")
        self.client.send_data(sid, message(self.request("m")))
        self.pump()
        self.client.reset_stream(sid)
        self.pump()
        self.assertEqual(self.health._watches.get("m"), set())
        self.health.set("m", SERVING)  # no one to tell
        self.pump()
        self.assertEqual(self.front.active, 0)


class HeaderValueTests(SynchronousTestCase):
    def test_parse_timeout(self):
        for value, seconds in [(b"1H", 3600.0), (b"2M", 120.0), (b"5S", 5.0), (b"100m", 0.1),
                               (b"250u", 250e-6), (b"7n", 7e-9), (b"99999999S", 99999999.0),
                               (b"0m", 0.0)]:
            self.assertAlmostEqual(parse_timeout(value), seconds, msg=value)
        for value in [b"", b"S", b"5", b"5s", b"5x", b"-5S", b"1.5S", b"123456789S", b" 5S", b"5 S"]:
            self.assertIsNone(parse_timeout(value), value)

    def test_grpc_message(self):
        self.assertEqual(grpc_message("plain text: ok!"), b"plain text: ok!")
        self.assertEqual(grpc_message("100%"), b"100%25")
        self.assertEqual(grpc_message("caf\u00e9"), b"caf%C3%A9")
        self.assertEqual(grpc_message("two\nlines\t"), b"two%0Alines%09")
        self.assertEqual(grpc_message("\x7f~ "), b"%7F~%20")  # no whitespace at either end
        self.assertEqual(grpc_message(" "), b"%20")
        self.assertEqual(grpc_message(" a b "), b"%20a b%20")
        self.assertEqual(grpc_message(""), b"")


class ApiMethodsTests(SynchronousTestCase):
    def test_parsed_and_raw_methods(self):
        """api_methods: protobuf (de)serializers for parsed methods, none for
        raw ones, streams marked, ModelInfer counted, absent methods left out."""
        class Api:
            service_name = protos.INFERENCE_SERVICE
            raw_methods = ("ModelInfer",)
            stream_methods = ("ModelStreamInfer",)

            def default_timeout(self, name):
                return 600.0 if name == "ModelInfer" else 5.0

            def ServerLive(self, request, timeout):
                return protos.inference.ServerLiveResponse(live=True)

            def ModelInfer(self, request, timeout):
                return request

            def ModelStreamInfer(self, send, timeout):
                return None

        methods = api_methods(Api())
        prefix = "/%s/" % protos.INFERENCE_SERVICE
        self.assertEqual(sorted(methods), sorted(prefix + n for n in ("ServerLive", "ModelInfer",
                                                                      "ModelStreamInfer")))
        live = methods[prefix + "ServerLive"]
        self.assertEqual((live.streaming, live.counted, live.default_timeout), (False, False, 5.0))
        self.assertEqual(live.serialize(live.call(live.parse(b""), 1)), b"\x08\x01")
        with self.assertRaises(InferenceError) as caught:
            live.parse(b"\x0a\xff\xff")
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        infer = methods[prefix + "ModelInfer"]
        self.assertEqual((infer.parse, infer.serialize, infer.counted, infer.default_timeout),
                         (None, None, True, 600.0))
        self.assertTrue(methods[prefix + "ModelStreamInfer"].streaming)


# -- regressions: defects found by the review of the h2 front -----------------------------


class SameReadResetTests(H2TestCase):
    """A client may reset a stream (or send GOAWAY) in the very bytes the
    front is handling: h2 has closed the stream before the front answers, and
    the answer must not raise out of dataReceived (which killed the
    connection) nor leave the call counted."""

    max_message_size = 1 << 20

    def assertConnectionServes(self):
        self.assertFalse(self.transport.disconnecting)
        sid = self.call("Echo", b"still")
        self.assertEqual(self.responses[sid].messages(), [b"echo:still"])
        self.assertEqual(self.responses[sid].status, 0)

    def test_reset_with_a_refused_request(self):
        sid = self.open("Nope")
        self.client.send_data(sid, message(b"x"), end_stream=True)
        self.client.reset_stream(sid)
        self.protocol.dataReceived(self.client.data_to_send())
        self.pump()
        self.assertEqual(self.protocol.calls, {})
        self.assertEqual(self.front.active, 0)
        self.assertConnectionServes()

    def test_reset_with_a_request_answered_at_once(self):
        sid = self.open("Echo")
        self.client.send_data(sid, message(b"x"), end_stream=True)
        self.client.reset_stream(sid)
        self.protocol.dataReceived(self.client.data_to_send())
        self.pump()
        self.assertIsNone(self.responses[sid].trailers)
        self.assertEqual(self.protocol.calls, {})
        self.assertEqual(self.front.active, 0)
        self.assertConnectionServes()

    def test_answer_after_the_client_goaway(self):
        """The client says GOAWAY while its call waits on the worker; the
        answer that comes before the connection is lost is dropped."""
        self.call("Later", b"q")
        self.client.close_connection()
        self.pump()
        self.api.pending[0].callback(b"late")
        self.assertIsNone(self.successResultOf(self.api.pending[0]))  # nothing raised in it
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.protocol.calls, {})
        self.assertEqual(self.protocol.unread, 0)
        self.assertEqual(self.unread.total, 0)


class WindowAndResetTests(H2TestCase):
    """A window update and a reset of the same stream in one read, while the
    stream's answer waits for that window: the call ends, its worker stream is
    cancelled and its unsent bytes leave the unread-bytes count (left there,
    they aborted the client's connection later)."""

    max_message_size = 1 << 20

    def waiting_stream(self, size=70000):
        """A Chat stream whose answer of ``size`` bytes waits for the window."""
        sid = self.open("Chat")
        self.client.send_data(sid, message(b"a"))
        self.pump()
        stream = self.api.streams[0]
        stream.send(b"y" * size)
        self.pump()
        self.assertTrue(self.protocol.calls[sid].pending)
        self.assertGreater(self.unread.total, 0)
        return sid, stream

    def assertAllReleased(self, stream):
        self.assertTrue(stream.cancelled)
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.protocol.calls, {})
        self.assertEqual(self.protocol.unread, 0)
        self.assertEqual(self.unread.total, 0)
        self.assertFalse(self.transport.disconnecting)

    def test_stream_window_and_reset_in_one_read(self):
        sid, stream = self.waiting_stream()
        self.client.increment_flow_control_window(100000)
        self.client.increment_flow_control_window(100000, stream_id=sid)
        self.client.reset_stream(sid)
        self.protocol.dataReceived(self.client.data_to_send())
        self.pump()
        self.assertAllReleased(stream)


class BigWindowAndResetTests(WindowAndResetTests):
    """The same with a stream window larger than the connection's: the
    answer waits for the connection window only."""

    window = 1 << 20

    def test_window_makes_the_streams_window(self):
        self.assertEqual(self.protocol.conn.remote_settings.initial_window_size, 1 << 20)

    def test_connection_window_and_reset_in_one_read(self):
        sid, stream = self.waiting_stream()
        self.assertEqual(self.protocol.conn.outbound_flow_control_window, 0)
        self.client.increment_flow_control_window(100000)  # the connection's
        self.client.reset_stream(sid)
        self.protocol.dataReceived(self.client.data_to_send())
        self.pump()
        self.assertAllReleased(stream)


class BufferTransport(StringTransport):
    """A StringTransport whose written bytes all count as unsent, as Twisted's
    own transport shows them (``dataBuffer``, ``offset``, ``_tempDataLen``),
    on top of ``held`` bytes already waiting: a client that does not read."""

    dataBuffer = b""
    offset = 0
    held = 0

    @property
    def _tempDataLen(self):
        return self.held + self.io.tell()


class UnreadPingTests(H2TestCase):
    """A client that sends PINGs (whose acknowledgements the front must
    write) but never reads: once its unsent bytes pass MAX_UNSENT the front
    stops reading it, instead of letting Twisted buffer without bound."""

    def setUp(self):
        super().setUp()
        self.transport = BufferTransport()
        self.protocol = GrpcH2Protocol(self.front)
        self.protocol.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.pump()

    def pings(self, count):
        return b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize() for i in range(count))

    def test_a_client_that_does_not_read_is_not_read(self):
        self.transport.held = MAX_UNSENT  # e.g. an answer it never took
        self.protocol.pauseProducing()  # as the transport does once its buffer is full
        self.protocol.dataReceived(self.pings(10))
        self.assertEqual(self.transport.producerState, "producing")  # not yet over
        self.protocol.dataReceived(self.pings(2000))  # 34,000 bytes of acknowledgements
        self.assertEqual(self.transport.producerState, "paused")
        # Once the client has read its bytes, the front reads it again.
        self.transport.held = 0
        self.transport.clear()
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.protocol.dataReceived(self.pings(1))
        self.assertGreater(len(self.transport.value()), 0)

    def test_a_reading_client_is_read(self):
        """Under the cap, or not paused: reading goes on."""
        self.protocol.dataReceived(self.pings(2000))
        self.assertEqual(self.transport.producerState, "producing")
        self.transport.held = MAX_UNSENT
        self.protocol.dataReceived(self.pings(2000))  # not paused: the transport has room
        self.assertEqual(self.transport.producerState, "producing")


class HeaderBlockTests(H2TestCase):
    """A header block arriving in CONTINUATION frames is refused once it is
    over MAX_HEADER_BLOCK, not buffered until h2 checks the header list."""

    def held(self):
        return sum(len(f.data) for f in self.protocol.conn.incoming_buffer._headers_buffer)

    def test_header_block_over_the_limit(self):
        sid = self.client.get_next_available_stream_id()
        self.protocol.dataReceived(HeadersFrame(sid, data=b"\x00" * 16384).serialize())
        for _ in range(MAX_HEADER_BLOCK // 16384 + 4):
            if self.transport.disconnecting:
                break
            self.assertLessEqual(self.held(), MAX_HEADER_BLOCK)
            self.protocol.dataReceived(ContinuationFrame(sid, data=b"\x00" * 16384).serialize())
        self.assertTrue(self.transport.disconnecting)
        self.assertLessEqual(self.held(), MAX_HEADER_BLOCK + 16384)


class StreamLimitTests(H2TestCase):
    """Streams per connection are bounded, and a stream the front refuses is
    closed in h2 (else, never ended by its client, it stayed there)."""

    def test_advertised_limit(self):
        self.assertEqual(self.client.remote_settings.max_concurrent_streams, MAX_STREAMS)
        self.assertEqual(self.protocol.conn.local_settings.max_concurrent_streams, MAX_STREAMS)

    def test_refused_streams_are_closed(self):
        unended = [self.open("Nope") for _ in range(5)]
        not_grpc = self.client.get_next_available_stream_id()
        self.responses[not_grpc] = Response()
        self.client.send_headers(not_grpc, [(b":method", b"POST"), (b":scheme", b"http"),
                                            (b":path", b"/test.Fake/Echo"), (b":authority", b"t"),
                                            (b"content-type", b"text/plain")])
        self.pump()
        for sid in unended:
            self.assertEqual(self.responses[sid].status, grpc.StatusCode.UNIMPLEMENTED.value[0])
        self.assertEqual(self.responses[not_grpc].headers[b":status"], b"415")
        self.assertEqual(self.protocol.conn.open_inbound_streams, 0)
        self.assertEqual(self.client.open_outbound_streams, 0)
        self.assertFalse(self.transport.disconnecting)
        sid = self.call("Echo", b"after")
        self.assertEqual(self.responses[sid].status, 0)


class RapidResetTests(H2TestCase):
    """HEADERS, DATA with END_STREAM and RST_STREAM for a call, all in one
    read: the request is not handed to the API (which would forward it to a
    worker, then cancel it)."""

    def test_requests_reset_in_the_same_read_are_not_made(self):
        for _ in range(10):
            sid = self.open("Later")
            self.client.send_data(sid, message(b"q"), end_stream=True)
            self.client.reset_stream(sid)
        self.protocol.dataReceived(self.client.data_to_send())
        self.pump()
        self.assertEqual(self.api.requests, [])
        self.assertEqual(self.api.cancelled, 0)
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.protocol.calls, {})
        self.assertFalse(self.transport.disconnecting)
        sid = self.call("Echo", b"next")
        self.assertEqual(self.responses[sid].messages(), [b"echo:next"])


class UnendedUnaryTests(H2TestCase):
    """A unary call whose request never ends, without grpc-timeout, is
    bounded by the method's default timeout (30 s here) from its first
    byte: else it held its place, and its buffered bytes, for ever."""

    max_message_size = 1 << 20

    def test_headers_only(self):
        sid = self.open("Echo")
        self.pump()
        self.assertEqual(self.front.active, 1)
        self.clock.advance(29)
        self.pump()
        self.assertEqual(self.front.active, 1)
        self.clock.advance(2)
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.protocol.calls, {})
        self.assertEqual(len(self.timeouts), 0)
        self.assertEqual(self.api.requests, [])

    def test_part_of_a_body(self):
        sid = self.open("Echo")
        self.client.send_data(sid, message(b"z" * 100000)[:50000])
        self.pump()
        self.assertEqual(self.protocol.calls[sid].size, 50000)
        self.clock.advance(31)
        self.pump()
        self.assertEqual(self.responses[sid].status, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        self.assertEqual(self.protocol.calls, {})
        self.assertEqual(self.front.active, 0)

    def test_ended_in_time_is_answered(self):
        """The bound counts from the first byte, and the call's own timer
        (the one its Deferred gets) replaces it once the request is in."""
        sid = self.open("Later")
        self.pump()
        self.clock.advance(20)
        self.client.send_data(sid, message(b"q"), end_stream=True)
        self.pump()
        self.assertEqual(self.api.requests, [(b"q", 30.0)])
        self.api.pending[0].callback(b"ok")
        self.pump()
        self.assertEqual(self.responses[sid].messages(), [b"ok"])
        self.assertEqual(self.responses[sid].status, 0)
        self.assertEqual(len(self.timeouts), 0)


class WatchAfterShutdownTests(H2TestCase):
    """A Watch whose request arrives after the health service was shut down
    is told NOT_SERVING and ends: else it kept the front's drain open for
    its whole grace."""

    def setUp(self):
        super().setUp()
        from anyserve_tw.ingress.health import SERVING, ReactorHealth
        self.health = ReactorHealth()
        self.health.set("", SERVING)
        self.front.methods.update(health_methods(self.health))

    def test_watch_request_after_shutdown(self):
        from grpc_health.v1 import health_pb2

        from anyserve_tw.ingress.health import NOT_SERVING
        self.front._listening = FakePort()
        self.front.running = True
        sid = self.open(None, path=b"/grpc.health.v1.Health/Watch")
        self.pump()
        self.health.shutdown()
        stopped = self.front.stopService()
        self.client.send_data(sid, message(health_pb2.HealthCheckRequest(service="").SerializeToString()))
        self.pump()
        statuses = [health_pb2.HealthCheckResponse.FromString(m).status
                    for m in self.responses[sid].messages()]
        self.assertEqual(statuses, [NOT_SERVING])
        self.assertEqual(self.responses[sid].status, 0)
        self.assertEqual(self.front.active, 0)
        self.assertEqual(self.health._watches.get("", set()), set())
        self.assertTrue(self.transport.disconnecting)
        self.successResultOf(stopped)

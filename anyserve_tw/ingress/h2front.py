"""A front serving gRPC with our own HTTP/2 protocol on the reactor (``--front h2``).

grpc.aio hands every RPC between grpc's C-core threads and the asyncio loop;
on the 2-core development machine a server answering canned bytes with it
cost about 350 us of CPU per request at 1 in flight and 200 us at 16, against
about 240 us and 123 us for the same answer served by the ``h2`` library in a
Twisted protocol, with 20% less latency at 1 in flight.  Here the reactor
thread reads the HTTP/2 frames, calls the reactor-side API (the same
:class:`~anyserve_tw.ingress.inference.InferenceAPI` the other fronts serve)
and writes its answer: no thread, no second event loop.

What gRPC's own server does for the other fronts is done here:

- the gRPC framing of messages (5-byte prefix; compressed messages are
  refused: no ``grpc-accept-encoding`` is advertised), trailers with
  ``grpc-status`` and a percent-encoded ``grpc-message``;
- deadlines: ``grpc-timeout`` bounds the call (a timer for the calls that
  carry one); calls without one are bounded by the API's default through
  the shared sweep (:class:`~anyserve_tw.ingress.aiofront.RequestTimeouts`);
  a client's RST_STREAM or a lost connection cancels the call, which tells
  the worker;
- ``--max-concurrent-rpcs`` (RESOURCE_EXHAUSTED past it),
  ``--max-message-size`` both ways, UNAVAILABLE while draining;
- HTTP/2 flow control both ways, and the transport's own back-pressure: an
  answer the client does not read waits here, counted against the client's
  unread-bytes cap (:mod:`~anyserve_tw.ingress.backpressure`).

Not served on this front: TLS (``--tls-cert`` keeps the asyncio front) and
server interceptors (only the management port, which stays on grpc.aio,
has them).
"""
import binascii
import struct

import grpc
import hyperframe.frame
from h2.config import H2Configuration
from h2.connection import ConnectionInputs, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, RemoteSettingsChanged, RequestReceived, StreamEnded,
    StreamReset, WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from h2.stream import StreamInputs
from hyperframe.frame import DataFrame
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from anyserve_tw.ingress.aiofront import STREAM_BACKOFF
from anyserve_tw.ingress.backpressure import COUNTED_METHODS, UNREAD_TIMEOUT
from anyserve_tw.ingress.interfaces import GrpcFrontService, IGrpcFront
from anyserve_tw.wire import defaults, framing, rpc
from anyserve_tw.wire.errors import InferenceError, as_inference_error

#: Window we grant each stream and the connection: a 2 MiB request arrives
#: without waiting for WINDOW_UPDATEs.
RECEIVE_WINDOW = 16 * 1024 * 1024

#: Largest DATA frame a client may send us: a large request comes in a few
#: frames, not one event per 16 KiB.
MAX_FRAME_SIZE = 4 * 1024 * 1024

#: Bytes read from a client at a time.
READ_SIZE = 1024 * 1024

#: Largest header list we take (advertised), and largest encoded header
#: block we buffer while its CONTINUATION frames arrive.
MAX_HEADER_LIST_SIZE = 16384
MAX_HEADER_BLOCK = 4 * MAX_HEADER_LIST_SIZE

#: Streams one connection may have open at once.
MAX_STREAMS = 1024

#: Bytes of our own unsent frames (acknowledgements of PINGs and SETTINGS,
#: resets) past which we stop reading a client that does not read.
MAX_UNSENT = 4 * READ_SIZE

#: gRPC's ``grpc-timeout`` units, in seconds.
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

_OK_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)
_PREFIX = struct.Struct(">BI")

#: An HTTP/2 frame header: length (24 bits, as 16 + 8), type, flags, stream.
_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA = 0x0
_END_STREAM = 0x1

#: Most bytes of one answer written at once by :meth:`GrpcH2Protocol._send_frames`,
#: so that a transport that fills up pauses us between batches.
SEND_BATCH = 256 * 1024


def _raw_data_repr(data):
    """hyperframe's debug text of a frame's data, without copying and
    hexlifying all of it.

    h2 builds ``repr(frame)`` of every frame it receives for a trace log line
    whether anything logs it or not, and hyperframe serializes a DATA frame's
    whole body and hexlifies it to show its first ten bytes: a third of the
    ingress's CPU on 2 MiB requests (py-spy).  The same text, from ten bytes."""
    if not data:
        return "None"
    shown = binascii.hexlify(bytes(data[:11])).decode("ascii")
    return "<hex:" + (shown[:20] + "..." if len(shown) > 20 else shown) + ">"


hyperframe.frame._raw_data_repr = _raw_data_repr
hyperframe.frame.DataFrame._body_repr = lambda frame: _raw_data_repr(frame.data)


def parse_timeout(value):
    """Seconds in a ``grpc-timeout`` header value (``100m``, ``5S``), None if malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


def grpc_message(text):
    """``grpc-message``: the text's UTF-8, printable ASCII but ``%`` as is,
    the rest percent-encoded, and so is a space at either end: an HTTP/2
    field value may not start or end with whitespace, and h2 clients drop
    the whole connection over one that does."""
    out = bytearray()
    for byte in text.encode("utf-8", "replace"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    if out[:1] == b" ":
        out[:1] = b"%20"
    if out[-1:] == b" ":
        out[-1:] = b"%20"
    return bytes(out)


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer, with two changes.

    - A run of DATA frames on one stream, all here, is handed to h2 as one
      frame with their bodies joined (in one copy, where h2 makes two of
      each): h2 then runs its state machine, flow control and our event
      handler once per read, not once per 16 KiB (the frame size most
      clients send however large a frame we allow).  Only unpadded frames
      are taken, so the flow-controlled length is the same; h2 parses and
      judges every other frame itself.
    - A header block larger than :data:`MAX_HEADER_BLOCK` is refused while it
      arrives: h2 checks the header list's size only once the block is
      complete, up to 64 CONTINUATION frames of up to :data:`MAX_FRAME_SIZE`
      each later."""

    def __next__(self):
        data = self._data
        if self._headers_buffer or len(data) < _FRAME_HEADER.size:
            return super().__next__()
        run = []  # (start, end) of each body
        position = 0
        stream_id = None
        ended = False
        while len(data) - position >= _FRAME_HEADER.size:
            high, low, kind, flags, stream = _FRAME_HEADER.unpack_from(data, position)
            length = high << 8 | low
            stream &= 0x7FFFFFFF
            start = position + _FRAME_HEADER.size
            if (kind != _DATA or flags & ~_END_STREAM or length > self.max_frame_size
                    or len(data) - start < length or stream == 0
                    or stream != (stream if stream_id is None else stream_id)):
                break
            stream_id = stream
            run.append((start, start + length))
            position = start + length
            if flags & _END_STREAM:
                ended = True
                break
        if not run:
            return super().__next__()  # h2 parses (and judges) the frame itself
        frame = DataFrame(stream_id)
        with memoryview(data) as view:
            frame.data = b"".join([view[start:end] for start, end in run])
        if ended:
            frame.flags.add("END_STREAM")
        del data[:position]
        return frame

    def _update_header_buffer(self, f):
        f = super()._update_header_buffer(f)
        if sum(len(frame.data) for frame in self._headers_buffer) > MAX_HEADER_BLOCK:
            raise ProtocolError("header block over %d bytes" % MAX_HEADER_BLOCK)
        return f


class Method:
    """One RPC: ``call(request, timeout)`` (unary) or ``call(send, timeout)``
    (a stream object: ``request``, ``half_close``, ``cancel``, ``full``),
    with the (de)serializers of its messages (None: raw bytes)."""

    __slots__ = ("name", "call", "parse", "serialize", "streaming", "default_timeout", "counted")

    def __init__(self, name, call, parse, serialize, streaming, default_timeout, counted=False):
        self.name = name
        self.call = call
        self.parse = parse
        self.serialize = serialize
        self.streaming = streaming
        self.default_timeout = default_timeout
        self.counted = counted


def _parser(request_class):
    """A deserializer raising INVALID_ARGUMENT for bytes that don't parse."""
    lenient = rpc.lenient_parser(request_class)

    def parse(data):
        request = lenient(data)
        if type(request) is InferenceError:
            raise request
        return request
    return parse


def api_methods(api):
    """{path: Method} for every RPC ``api`` answers (see
    :class:`~anyserve_tw.ingress.interfaces.IGrpcFront`)."""
    streams = getattr(api, "stream_methods", ())
    methods = {}
    for name, request_class, response_class in rpc.service_methods(api.service_name):
        if not hasattr(api, name):
            continue
        raw = name in api.raw_methods
        methods["/%s/%s" % (api.service_name, name)] = Method(
            name, getattr(api, name), None if raw else _parser(request_class),
            None if raw else response_class.SerializeToString, name in streams,
            api.default_timeout(name), name in COUNTED_METHODS)
    return methods


def health_methods(health, default_timeout=5.0):
    """{path: Method} of gRPC's health service, answered by ``health``
    (:class:`~anyserve_tw.ingress.health.ReactorHealth`)."""
    from grpc_health.v1 import health_pb2

    prefix = "/%s/" % health.service_name
    serialize = health_pb2.HealthCheckResponse.SerializeToString
    parse = _parser(health_pb2.HealthCheckRequest)
    return {
        prefix + "Check": Method("Check", health.Check, parse, serialize, False, default_timeout),
        prefix + "Watch": Method("Watch", health.Watch, parse, serialize, True, default_timeout),
    }


class _Call:
    """One RPC on a connection."""

    __slots__ = ("protocol", "stream_id", "method", "timeout", "body", "size", "deferred", "timer",
                 "stream", "answered", "headers_sent", "pending", "trailers", "unacknowledged", "feeding",
                 "ended", "retry")

    def __init__(self, protocol, stream_id, method, timeout):
        self.protocol = protocol
        self.stream_id = stream_id
        self.method = method
        self.timeout = timeout
        self.body = []
        self.size = 0
        self.deferred = None
        self.timer = None
        self.stream = None
        self.answered = False
        self.headers_sent = False
        self.pending = []  # data waiting for the flow-control window or the transport
        self.trailers = None  # sent once pending is
        self.unacknowledged = 0  # a stream's padding bytes not acknowledged yet
        self.feeding = False
        self.ended = False  # a stream's client sent its last message
        self.retry = None  # a full stream's next look for room

    # The sweep's side (RequestTimeouts): like an asyncio future.
    def done(self):
        return self.answered

    def set_result(self, failure):
        self.protocol.fail(self, InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))


class GrpcH2Protocol(Protocol):
    """gRPC over one HTTP/2 connection (see the module docstring)."""

    def __init__(self, front):
        self.front = front
        self.calls = {}
        self.paused = False
        self.peer = None
        self.socket = None
        self.hold = None
        self.unread = 0
        self.stalled = False  # not reading: our own frames wait unsent

    # -- connection --------------------------------------------------------------

    def connectionMade(self):
        front = self.front
        address = self.transport.getPeer()  # named as grpc names peers, for the unread-bytes caps
        host = getattr(address, "host", "?")
        self.peer = ("ipv6:[%s]:%s" if ":" in host else "ipv4:%s:%s") % (host, getattr(address, "port", "?"))
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        # Larger reads: a 2 MiB request in a few recv()s, not 32.  (It is also
        # the size past which the transport pauses us: see pauseProducing.)
        self.transport.bufferSize = READ_SIZE
        self.socket = framing.stream_socket(self.transport)
        self.transport.registerProducer(self, True)
        self.conn = H2Connection(config=front.h2_config)
        buffer = _FrameBuffer(server=True)
        buffer.max_frame_size = self.conn.incoming_buffer.max_frame_size
        self.conn.incoming_buffer = buffer
        self.conn.initiate_connection()
        # A second SETTINGS frame: h2 applies each once the client acknowledges it.
        self.conn.update_settings({
            SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        })
        self.conn.increment_flow_control_window(RECEIVE_WINDOW - 65535)
        front.connections.add(self)
        if front.unread is not None:
            self.hold = front.unread.open(self.peer, self.transport.abortConnection)
        self._flush()

    def connectionLost(self, reason):
        self.front.connections.discard(self)
        for call in list(self.calls.values()):
            self._cancel(call)
        self.calls.clear()
        if self.hold is not None:
            self.front.unread.close(self.hold)
            self.hold = None

    # IPushProducer: the transport's buffer is full, or has room again.
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        if self.stalled:
            self.stalled = False
            self.transport.resumeProducing()
        self._send_pending()
        self._flush()

    def stopProducing(self):
        pass

    def dataReceived(self, data):
        conn = self.conn
        try:
            events = conn.receive_data(data)
        except ProtocolError:
            self._flush()
            self.transport.loseConnection()
            return
        # Streams the client resets in this same read: their requests are not
        # run (a rapid-reset client would have each one forwarded, then cancelled).
        resets = {e.stream_id for e in events if type(e) is StreamReset} if len(events) > 1 else ()
        room = False  # more window: answers waiting for it are sent once per read, not per frame
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                self._data(event)
            elif kind is RequestReceived:
                self._request(event)
            elif kind is StreamEnded:
                if event.stream_id not in resets:
                    self._ended(event.stream_id)
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                room = True
            elif kind is StreamReset:
                call = self.calls.pop(event.stream_id, None)
                if call is not None:
                    self._cancel(call)
            elif kind is ConnectionTerminated:
                self._flush()
                self.transport.loseConnection()
                return
        if room:
            self._send_pending()
        self._flush()

    def _flush(self):
        out = self.conn.data_to_send()
        if out:
            # In this turn of the loop when nothing waits before it: an answer
            # leaves without a round of the reactor for the socket's writability.
            framing.write_through(self.transport, self.socket, [out])
            if self.paused and not self.stalled and (
                    framing.unsent_bytes(self.transport) > MAX_UNSENT + self.conn.max_outbound_frame_size):
                # A client that sends (PINGs, SETTINGS...) but does not read.
                self.stalled = True
                self.transport.pauseProducing()

    # -- requests ----------------------------------------------------------------

    def _request(self, event):
        stream_id = event.stream_id
        path = timeout_value = content_type = verb = None
        for name, value in event.headers:
            if name == b":path":
                if path is not None:
                    return self._malformed(stream_id)
                path = value
            elif name == b":method":
                if verb is not None:
                    return self._malformed(stream_id)
                verb = value
            elif name == b"grpc-timeout":
                timeout_value = value
            elif name == b"content-type":
                content_type = value
        front = self.front
        if verb != b"POST":
            return self._end_stream(stream_id, ((b":status", b"405"),))
        if content_type is None or not content_type.startswith(b"application/grpc"):
            return self._end_stream(stream_id, ((b":status", b"415"),))
        method = front.methods.get(path.decode("latin-1") if path else "")
        if method is None:
            return self._refuse(stream_id, grpc.StatusCode.UNIMPLEMENTED,
                                "Method not found: %s" % (path or b"").decode("latin-1", "replace"))
        if front.draining:
            return self._refuse(stream_id, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if front.max_concurrent_rpcs is not None and front.active >= front.max_concurrent_rpcs:
            return self._refuse(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "Concurrent RPC limit exceeded!")
        if method.counted and front.unread is not None:
            try:
                front.unread.admit(self.peer)
            except InferenceError as e:
                return self._refuse(stream_id, e.code, e.message)
        timeout = None
        if timeout_value is not None:
            timeout = parse_timeout(timeout_value)
            if timeout is None:
                return self._refuse(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                                    "malformed grpc-timeout %r" % timeout_value.decode("latin-1"))
        call = _Call(self, stream_id, method, timeout)
        self.calls[stream_id] = call
        front.active += 1
        if timeout is not None:
            call.timer = front.clock.callLater(timeout, self.fail, call, InferenceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        elif not method.streaming and front.timeouts is not None:
            # Bounded from its first byte: a request that never ends too.
            front.timeouts.watch(call, succeed(None), method.default_timeout)
        if method.streaming:
            self._open_stream(call)

    def _malformed(self, stream_id):
        """A request whose ``:path`` or ``:method`` comes twice is malformed
        (RFC 9113, 8.1.1): reset it rather than pick one of the two, which a
        proxy in front may have read differently."""
        try:
            self.conn.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
        except ProtocolError:
            pass  # the client reset it in the same read

    def _refuse(self, stream_id, code, message):
        self._end_stream(stream_id, _OK_HEADERS + (
            (b"grpc-status", b"%d" % code.value[0]), (b"grpc-message", grpc_message(message))))

    def _end_stream(self, stream_id, headers):
        """Answer a stream no call was made for, and close it: h2 would
        otherwise hold it open until the client ends it."""
        conn = self.conn
        try:
            conn.send_headers(stream_id, headers, end_stream=True)
            stream = conn.streams.get(stream_id)
            if stream is not None and not stream.closed:
                conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except ProtocolError:
            pass  # the client reset it in the same read

    def _data(self, event):
        stream_id = event.stream_id
        call = self.calls.get(stream_id)
        if call is None or call.answered or call.stream is None:
            # A stream's data is acknowledged once its stream takes it:
            # flow control holds back a client that sends faster.
            self._acknowledge(event.flow_controlled_length, stream_id)
        if call is None or call.answered:
            return
        call.body.append(event.data)
        call.size += len(event.data)
        if call.stream is not None:
            call.unacknowledged += event.flow_controlled_length - len(event.data)  # padding
            self._stream_messages(call)
        elif call.size > self.front.max_message_size + _PREFIX.size:
            self.fail(call, InferenceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (%d vs. %d)"
                % (call.size - _PREFIX.size, self.front.max_message_size)))

    def _acknowledge(self, size, stream_id):
        if size:
            try:
                self.conn.acknowledge_received_data(size, stream_id)
            except StreamClosedError:
                pass

    def _ended(self, stream_id):
        call = self.calls.get(stream_id)
        if call is None or call.answered:
            return
        if call.stream is not None:
            call.ended = True
            self._stream_messages(call)  # half-closes once the stream has every message
            return
        try:
            message = self._one_message(call)
            method = call.method
            request = message if method.parse is None else method.parse(message)
            timeout = call.timeout if call.timeout is not None else method.default_timeout
            result = method.call(request, timeout)
        except InferenceError as e:
            return self.fail(call, e)
        except Exception:
            return self.fail(call, as_inference_error(Failure()))
        if isinstance(result, Deferred):
            call.deferred = result  # what a deadline, a reset or the sweep (watching since _request) cancels
            result.addBoth(self._unary_done, call)
        else:
            self._answer(call, result)

    def _message_length(self, data, offset=0):
        """The length of the gRPC message whose prefix starts at
        ``data[offset]``; InferenceError for a compressed or oversized one."""
        flag, length = _PREFIX.unpack_from(data, offset)
        if flag:
            raise InferenceError(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted")
        if length > self.front.max_message_size:
            raise InferenceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max "
                                 "(%d vs. %d)" % (length, self.front.max_message_size))
        return length

    def _one_message(self, call):
        """A unary call's one message, in one copy of its DATA (not a join
        and then a slice)."""
        chunks, call.body = call.body, None
        if len(chunks[0]) < _PREFIX.size:  # the prefix split over frames: rare
            chunks = [b"".join(chunks)]
        if len(chunks[0]) < _PREFIX.size:
            raise InferenceError(grpc.StatusCode.INTERNAL, "the request has no complete gRPC message")
        length = self._message_length(chunks[0])
        if call.size != _PREFIX.size + length:
            raise InferenceError(grpc.StatusCode.UNIMPLEMENTED if call.size > _PREFIX.size + length
                                 else grpc.StatusCode.INTERNAL,
                                 "a unary call takes exactly one message")
        chunks[0] = memoryview(chunks[0])[_PREFIX.size:]
        return chunks[0].tobytes() if len(chunks) == 1 else b"".join(chunks)

    def _unary_done(self, result, call):
        if self.calls.get(call.stream_id) is not call or call.answered:
            return None
        if isinstance(result, Failure):
            self.fail(call, as_inference_error(result))
        else:
            self._answer(call, result)
        self._flush()
        return None

    # -- streams --------------------------------------------------------------------

    def _open_stream(self, call):
        method = call.method
        timeout = call.timeout if call.timeout is not None else method.default_timeout

        def send(response):
            self._stream_send(call, response)

        try:
            call.stream = method.call(send, timeout)
        except InferenceError as e:
            self.fail(call, e)

    def _stream_messages(self, call):
        """Hand the complete messages the stream's body holds to its stream,
        while it has room (:meth:`InferStream.full`), acknowledging their
        bytes; the rest waits for its answers."""
        if call.feeding:
            return None  # called back from a request it handed over: that loop goes on
        call.feeding = True
        try:
            return self._feed(call)
        finally:
            call.feeding = False

    def _feed(self, call):
        body = b"".join(call.body)
        offset = 0
        while len(body) - offset >= _PREFIX.size and not call.stream.full(len(call.pending)):
            try:
                length = self._message_length(body, offset)
            except InferenceError as e:
                return self.fail(call, e)
            end = offset + _PREFIX.size + length
            if end > len(body):
                break
            message = body[offset + _PREFIX.size:end]
            offset = end
            self._acknowledge(_PREFIX.size + length + call.unacknowledged, call.stream_id)
            call.unacknowledged = 0
            call.size -= _PREFIX.size + length  # acknowledged: not _release's to do again
            try:
                call.stream.request(message if call.method.parse is None else call.method.parse(message))
            except InferenceError as e:
                return self.fail(call, e)
            if call.answered:
                return None
        rest = body[offset:]
        call.body = [rest] if rest else []
        call.size = len(rest)
        if rest and call.stream.full(len(call.pending)):
            if call.retry is None or not call.retry.active():
                call.retry = self.front.clock.callLater(STREAM_BACKOFF, self._look_again, call)
        elif call.ended:
            call.ended = False  # once
            call.stream.half_close()

    def _look_again(self, call):
        if not call.answered and call.size:
            self._stream_messages(call)
            self._flush()

    def _stream_send(self, call, response):
        if call.answered or self.calls.get(call.stream_id) is not call:
            return
        if response is None:
            self._finish(call, _OK_TRAILERS)
        elif isinstance(response, InferenceError):
            self.fail(call, response)
        else:
            payload = response if call.method.serialize is None else call.method.serialize(response)
            self._send_message(call, payload)
        self._flush()

    # -- answers ----------------------------------------------------------------

    def _answer(self, call, result):
        payload = result if call.method.serialize is None else call.method.serialize(result)
        if len(payload) > self.front.max_message_size:
            return self.fail(call, InferenceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max (%d vs. %d)"
                % (len(payload), self.front.max_message_size)))
        if self._send_message(call, payload):
            self._finish(call, _OK_TRAILERS)

    def _send_message(self, call, payload):
        """Queue one message of ``call``; False if the unread-bytes cap
        refused it, which failed the call (RESOURCE_EXHAUSTED)."""
        size = len(payload) + _PREFIX.size
        if not call.headers_sent:
            call.headers_sent = True
            try:
                self.conn.send_headers(call.stream_id, _OK_HEADERS)
            except ProtocolError:  # reset (or GOAWAY) in the read being handled
                self._cancel(call)
                return False
        if self.hold is not None:
            try:
                self.front.unread.take(self.hold, size)
            except InferenceError as e:
                self.fail(call, e)
                return False
        prefix = _PREFIX.pack(0, len(payload))
        if len(payload) < 16384:
            data = prefix + payload
        else:
            call.pending.append(prefix)
            data = payload
        call.pending.append(memoryview(data))
        self.unread += size
        self._send_call(call)
        return True

    def fail(self, call, error):
        """End ``call`` with ``error``'s status (and cancel what it waits for)."""
        if call.answered:
            return
        if call.deferred is not None and not call.deferred.called:
            call.answered = True  # the cancel's failure is not the answer
            call.deferred.cancel()
            call.answered = False
        if call.stream is not None:
            call.stream.cancel()
        trailers = ((b"grpc-status", b"%d" % error.code.value[0]), (b"grpc-message", grpc_message(error.message)))
        if not call.headers_sent:
            call.headers_sent = True
            trailers = _OK_HEADERS + trailers
            call.pending = []
        self._finish(call, trailers)
        self._flush()

    def _finish(self, call, trailers):
        call.trailers = trailers
        self._release(call)
        self._settle(call)
        self._send_call(call)

    def _settle(self, call):
        """``call`` is answered: no timer, no sweep entry, no longer counted."""
        call.answered = True
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        if self.front.timeouts is not None:
            self.front.timeouts.forget(call)
        self.front.active -= 1
        self.front.call_ended()

    def _send_call(self, call):
        """Send what ``call`` has pending, as far as the windows and the
        transport let; its trailers once nothing is."""
        conn = self.conn
        stream_id = call.stream_id
        pending = call.pending
        try:
            while pending and not self.paused:
                window = conn.local_flow_control_window(stream_id)
                if window <= 0:
                    return
                chunk = pending[0]
                frame_size = conn.max_outbound_frame_size
                if len(chunk) > frame_size and window > frame_size:
                    chunk = chunk[:min(window, SEND_BATCH)]
                    self._send_frames(stream_id, chunk)  # may raise: pending still holds chunk
                else:
                    chunk = chunk[:min(window, frame_size)]
                    conn.send_data(stream_id, chunk)  # may raise: pending still holds chunk
                if len(chunk) == len(pending[0]):
                    pending.pop(0)
                else:
                    pending[0] = pending[0][len(chunk):]
                self._delivered(len(chunk))
                if len(chunk) >= 16384:
                    self._flush()  # to the transport, which may pause us
            if pending or self.paused:
                return
            if call.stream is not None and call.size and not call.answered:
                self._stream_messages(call)  # its answers are out: room for more requests
            if call.trailers is not None:
                conn.send_headers(stream_id, call.trailers, end_stream=True)
                call.trailers = None
                self.calls.pop(stream_id, None)
                stream = conn.streams.get(stream_id)
                if stream is not None and not stream.closed:
                    # Answered before the client finished sending: tell it to stop.
                    conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
                self.front.call_ended()  # its answer is out
        except ProtocolError:  # reset in the read being handled, or GOAWAY
            self._cancel(call)

    def _send_frames(self, stream_id, data):
        """Write ``data`` (a memoryview, within both windows) as DATA frames of
        the client's largest frame size, with h2's state and windows kept as
        its ``send_data`` would keep them.  h2 would copy each 16 KiB frame
        twice and go through its state machine for each; these frames are
        headers beside views of ``data``, given to the kernel in one call."""
        conn = self.conn
        conn.state_machine.process_input(ConnectionInputs.SEND_DATA)  # raise before any change
        stream = conn.streams[stream_id]
        stream.state_machine.process_input(StreamInputs.SEND_DATA)
        size = len(data)
        stream.outbound_flow_control_window -= size
        conn.outbound_flow_control_window -= size
        parts = []
        before = conn.data_to_send()  # what h2 queued goes first (the HEADERS)
        if before:
            parts.append(before)
        step = conn.max_outbound_frame_size
        pack = _FRAME_HEADER.pack
        for start in range(0, size, step):
            piece = data[start:start + step]
            parts.append(pack(len(piece) >> 8, len(piece) & 0xFF, _DATA, 0, stream_id))
            parts.append(piece)
        framing.write_through(self.transport, self.socket, parts)

    def _delivered(self, size):
        self.unread -= size
        if self.hold is not None:
            self.front.unread.give(self.hold, size)

    def _drop(self, call):
        left = sum(len(chunk) for chunk in call.pending)
        call.pending = []
        call.trailers = None
        if left:
            self._delivered(left)
        self.calls.pop(call.stream_id, None)
        self.front.call_ended()

    def _send_pending(self):
        for call in list(self.calls.values()):
            if call.pending and self.conn.outbound_flow_control_window <= 0:
                continue  # only trailers can go before the client opens the window
            if call.pending or call.trailers is not None:
                self._send_call(call)
                if self.paused:
                    return

    def _release(self, call):
        """Acknowledge what a stream's call held unread: the connection's
        window must not shrink by it for good."""
        if call.retry is not None and call.retry.active():
            call.retry.cancel()
        if call.stream is not None and (call.size or call.unacknowledged):
            self._acknowledge(call.size + call.unacknowledged, call.stream_id)
            call.body = []
            call.size = call.unacknowledged = 0

    def _cancel(self, call):
        """The client reset the stream, or went away."""
        self._release(call)
        if not call.answered:
            self._settle(call)
            if call.deferred is not None and not call.deferred.called:
                call.deferred.cancel()
            if call.stream is not None:
                call.stream.cancel()
        self._drop(call)


@implementer(IGrpcFront)
class H2GrpcService(GrpcFrontService):
    """Serves ``methods`` (``{path: Method}``, see :func:`api_methods`) on
    ``host:port`` over cleartext HTTP/2 on ``reactor``.

    ``validate_headers`` turns on h2's checks of every received header
    block (pseudo-headers, connection-specific fields, name case...).  They
    are off by default: they cost about a tenth of the latency of a small
    request at 1 in flight, and a call uses only ``:method``, ``:path``,
    ``content-type`` and ``grpc-timeout``, each checked as it is read; no
    header goes on to a worker."""

    def __init__(self, reactor, label, host, port, methods, timeouts=None,
                 max_message_size=defaults.MAX_MESSAGE_SIZE, max_concurrent_rpcs=None, grace=10.0,
                 unread=None, unread_timeout=UNREAD_TIMEOUT, validate_headers=False):
        super().__init__(label, host, port, methods, max_message_size, max_concurrent_rpcs, grace)
        self.reactor = self.clock = reactor
        self.methods = methods
        self.timeouts = timeouts
        self.unread = unread
        self.unread_timeout = unread_timeout
        self.h2_config = H2Configuration(
            client_side=False, header_encoding=None,
            validate_inbound_headers=validate_headers, normalize_inbound_headers=validate_headers,
            validate_outbound_headers=False, normalize_outbound_headers=False)
        self.connections = set()
        self.active = 0
        self.draining = False
        self._listening = None
        self._idle = None

    def startService(self):
        endpoint = endpoints.TCP4ServerEndpoint(self.reactor, self.port, interface=self.host) \
            if ":" not in self.host else endpoints.TCP6ServerEndpoint(self.reactor, self.port, interface=self.host)
        d = endpoint.listen(Factory.forProtocol(lambda: GrpcH2Protocol(self)))
        failure = []
        d.addCallbacks(self._listened, failure.append)
        if failure:
            raise RuntimeError("%s: cannot listen on %s:%d: %s"
                               % (self.label, self.host, self.port, failure[0].getErrorMessage()))
        if self.timeouts is not None:
            self.timeouts.start()
        super().startService()
        self.log.info("{label} gRPC listening on {host}:{port} (HTTP/2 front)",
                      label=self.label, host=self.host, port=self.bound_port)

    def _listened(self, port):
        self._listening = port
        self.bound_port = port.getHost().port

    def call_ended(self):
        """A call ended, or its answer is out: the end of a drain once no
        call is in flight and no answer waits to be sent."""
        if (self.draining and not self.active and self._idle is not None and not self._idle.called
                and not any(protocol.calls for protocol in self.connections)):
            self._idle.callback(None)

    def stopService(self):
        super().stopService()
        if self._listening is None:
            return None
        self.log_draining()
        self.draining = True
        stopped = self._listening.stopListening() or succeed(None)
        self._idle = Deferred()
        self.call_ended()
        idle = self._idle
        idle.addTimeout(self.grace, self.reactor).addErrback(lambda _: None)

        def close(_):
            if self.timeouts is not None:
                self.timeouts.stop()
            for protocol in list(self.connections):
                for call in list(protocol.calls.values()):
                    protocol.fail(call, InferenceError(grpc.StatusCode.UNAVAILABLE, "the server stopped"))
                protocol.conn.close_connection()
                protocol._flush()
                protocol.transport.loseConnection()
            self.log.info("{label} gRPC stopped", label=self.label)

        return DeferredList([stopped, idle.addCallback(close)])

"""Tests for anyserve_tw.wire.framing: the ingress <-> worker frame format."""
import os
import socket

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyserve_tw.wire import defaults, framing
from anyserve_tw.wire.framing import (
    CANCEL,
    ERROR,
    HEADER_SIZE,
    REQUEST,
    RESPONSE,
    FrameDecoder,
    FramedProtocol,
    encode_header,
)


def frame(kind, request_id, payload=b"", aux=0):
    """One encoded frame: header followed by payload."""
    return encode_header(kind, request_id, len(payload), aux) + payload


def feed_all(decoder, chunks):
    """Feed every chunk in turn; return everything the decoder produced."""
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def chunked(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


#: A varied sequence of frames used by several tests: every kind, an empty
#: payload, payloads shorter and longer than the header, and a large aux.
FRAMES = [
    (REQUEST, 1, 1500, b"hello"),
    (RESPONSE, 1, 0, b"x" * 37),
    (CANCEL, 2, 0, b""),
    (ERROR, 2**64 - 1, 14, "gone \u2603".encode("utf-8")),
    (REQUEST, 3, 2**32 - 1, bytes(range(256))),
]
ENCODED = b"".join(frame(k, i, p, a) for k, i, a, p in FRAMES)


class HeaderTests(SynchronousTestCase):
    """The 20-byte header layout."""

    def test_size(self):
        """The header is exactly 20 bytes."""
        self.assertEqual(HEADER_SIZE, 20)
        self.assertEqual(len(encode_header(REQUEST, 1, 0)), 20)

    def test_layout(self):
        """Fields sit at the documented offsets, big-endian."""
        header = encode_header(ERROR, 0x0102030405060708, 0x0A0B0C0D, aux=0x11223344)
        self.assertEqual(header[0:4], b"\x0a\x0b\x0c\x0d")
        self.assertEqual(header[4:5], bytes([ERROR]))
        self.assertEqual(header[5:8], b"\x00\x00\x00")
        self.assertEqual(header[8:16], bytes(range(1, 9)))
        self.assertEqual(header[16:20], b"\x11\x22\x33\x44")


class FrameDecoderTests(SynchronousTestCase):
    """FrameDecoder turns arbitrary chunks back into the frames sent."""

    def test_whole_frame(self):
        """One complete frame in one chunk decodes to one tuple."""
        decoder = FrameDecoder()
        self.assertEqual(
            decoder.feed(frame(REQUEST, 7, b"payload", aux=250)),
            [(REQUEST, 7, 250, b"payload")],
        )

    def test_nothing_until_complete(self):
        """A partial frame yields nothing; the rest completes it."""
        decoder = FrameDecoder()
        data = frame(RESPONSE, 9, b"abcdef")
        self.assertEqual(decoder.feed(data[:-1]), [])
        self.assertEqual(decoder.feed(data[-1:]), [(RESPONSE, 9, 0, b"abcdef")])

    def test_empty_chunk(self):
        """Feeding b'' is harmless, both idle and mid-frame."""
        decoder = FrameDecoder()
        data = frame(REQUEST, 1, b"abc")
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.feed(data[:5]), [])
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.feed(data[5:]), [(REQUEST, 1, 0, b"abc")])

    def test_zero_length_payload(self):
        """A header-only frame decodes with payload b''."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(frame(CANCEL, 42)), [(CANCEL, 42, 0, b"")])

    def test_zero_length_between_frames(self):
        """Zero-length frames are not confused with their neighbours."""
        decoder = FrameDecoder()
        data = frame(REQUEST, 1, b"a") + frame(CANCEL, 2) + frame(CANCEL, 3) + frame(REQUEST, 4, b"b")
        self.assertEqual(
            decoder.feed(data),
            [(REQUEST, 1, 0, b"a"), (CANCEL, 2, 0, b""), (CANCEL, 3, 0, b""), (REQUEST, 4, 0, b"b")],
        )

    def test_many_frames_one_chunk(self):
        """Several frames merged in one read all come out, in order."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(ENCODED), [(k, i, a, p) for k, i, a, p in FRAMES])

    def test_split_at_every_boundary(self):
        """Two chunks split anywhere (inside a header or a payload) decode the same."""
        expected = [(k, i, a, p) for k, i, a, p in FRAMES]
        for cut in range(len(ENCODED) + 1):
            decoder = FrameDecoder()
            got = feed_all(decoder, [ENCODED[:cut], ENCODED[cut:]])
            self.assertEqual(got, expected, "split at byte %d" % cut)

    def test_split_in_three_everywhere(self):
        """Three chunks split at every pair of cuts within the first frames."""
        data = frame(REQUEST, 5, b"0123456789", aux=3) + frame(CANCEL, 6) + frame(RESPONSE, 7, b"z")
        expected = [(REQUEST, 5, 3, b"0123456789"), (CANCEL, 6, 0, b""), (RESPONSE, 7, 0, b"z")]
        for first in range(len(data) + 1):
            for second in range(first, len(data) + 1):
                decoder = FrameDecoder()
                got = feed_all(decoder, [data[:first], data[first:second], data[second:]])
                self.assertEqual(got, expected, "cuts at %d, %d" % (first, second))

    def test_byte_at_a_time(self):
        """One byte per read still decodes every frame exactly once."""
        decoder = FrameDecoder()
        got = feed_all(decoder, [ENCODED[i:i + 1] for i in range(len(ENCODED))])
        self.assertEqual(got, [(k, i, a, p) for k, i, a, p in FRAMES])

    def test_mixed_chunk_sizes(self):
        """Reads that end mid-header, mid-payload and across frames, mixed."""
        sizes = [3, 30, 1, 17, 2, 64, 5, 300, 7]
        chunks = []
        pos = 0
        index = 0
        while pos < len(ENCODED):
            size = sizes[index % len(sizes)]
            chunks.append(ENCODED[pos:pos + size])
            pos += size
            index += 1
        decoder = FrameDecoder()
        self.assertEqual(feed_all(decoder, chunks), [(k, i, a, p) for k, i, a, p in FRAMES])

    def test_payload_types_are_bytes(self):
        """Payloads come back as bytes whether sliced, joined or whole."""
        decoder = FrameDecoder()
        data = frame(REQUEST, 1, b"abc") + frame(REQUEST, 2, b"defgh")
        got = feed_all(decoder, [data[:22], data[22:30], data[30:]])
        self.assertEqual([p for _, _, _, p in got], [b"abc", b"defgh"])
        for _, _, _, payload in got:
            self.assertIsInstance(payload, bytes)

    def test_state_empty_after_frames(self):
        """After complete frames the decoder holds no buffered bytes."""
        decoder = FrameDecoder()
        feed_all(decoder, chunked(ENCODED, 13))
        self.assertEqual(decoder._buffered, 0)
        self.assertEqual(len(decoder._chunks), 0)

    def test_large_payload_in_64k_chunks(self):
        """A multi-megabyte payload in 64 KiB reads decodes to identical bytes."""
        payload = os.urandom(5 * 1024 * 1024 + 123)
        data = frame(RESPONSE, 77, payload, aux=1) + frame(CANCEL, 78)
        decoder = FrameDecoder()
        results = [decoder.feed(chunk) for chunk in chunked(data, 64 * 1024)]
        got = [item for batch in results for item in batch]
        self.assertEqual(len(got), 2)
        kind, request_id, aux, body = got[0]
        self.assertEqual((kind, request_id, aux), (RESPONSE, 77, 1))
        self.assertEqual(len(body), len(payload))
        self.assertTrue(body == payload)
        self.assertEqual(got[1], (CANCEL, 78, 0, b""))
        # Nothing came out before the last chunk holding the big payload's end.
        self.assertEqual([len(batch) for batch in results].count(0), len(results) - 1)


class OversizeTests(SynchronousTestCase):
    """Frames over max_payload are reported and skipped, not buffered."""

    def test_reported(self):
        """An oversize frame gives ('oversize', kind, id, length)."""
        decoder = FrameDecoder(max_payload=10)
        out = decoder.feed(frame(REQUEST, 5, b"x" * 11, aux=99))
        self.assertEqual(out, [("oversize", REQUEST, 5, 11)])

    def test_exactly_max_is_fine(self):
        """A payload of exactly max_payload bytes is delivered."""
        decoder = FrameDecoder(max_payload=10)
        self.assertEqual(decoder.feed(frame(REQUEST, 5, b"y" * 10)), [(REQUEST, 5, 0, b"y" * 10)])

    def test_skipped_then_next_frame_decodes(self):
        """The frame after an oversize one, in the same chunk, decodes."""
        decoder = FrameDecoder(max_payload=4)
        data = frame(REQUEST, 1, b"too long") + frame(REQUEST, 2, b"ok") + frame(CANCEL, 3)
        self.assertEqual(
            decoder.feed(data),
            [("oversize", REQUEST, 1, 8), (REQUEST, 2, 0, b"ok"), (CANCEL, 3, 0, b"")],
        )

    def test_big_oversize_in_chunks_not_buffered(self):
        """A big oversize payload arriving in chunks is dropped as it comes."""
        max_payload = 1024
        chunk_size = 64 * 1024
        big = 4 * 1024 * 1024
        decoder = FrameDecoder(max_payload=max_payload)
        out = decoder.feed(encode_header(REQUEST, 11, big))
        self.assertEqual(out, [("oversize", REQUEST, 11, big)])
        sent = 0
        while sent < big:
            n = min(chunk_size, big - sent)
            self.assertEqual(decoder.feed(b"\xab" * n), [])
            sent += n
            # Skipped bytes are thrown away, never accumulated.
            self.assertEqual(decoder._buffered, 0)
            self.assertEqual(len(decoder._chunks), 0)
        self.assertEqual(decoder.feed(frame(RESPONSE, 12, b"after")), [(RESPONSE, 12, 0, b"after")])

    def test_oversize_tail_shares_chunk_with_next_frame(self):
        """The end of a skipped payload and the next frame in one read."""
        decoder = FrameDecoder(max_payload=3)
        data = frame(REQUEST, 1, b"abcdefghij") + frame(REQUEST, 2, b"abc")
        # First read: header + 4 payload bytes; second: the rest + next frame.
        self.assertEqual(decoder.feed(data[:24]), [("oversize", REQUEST, 1, 10)])
        self.assertEqual(decoder.feed(data[24:]), [(REQUEST, 2, 0, b"abc")])

    def test_oversize_split_everywhere(self):
        """Any split around an oversize frame gives the same results."""
        data = frame(REQUEST, 1, b"a") + frame(ERROR, 2, b"0123456789") + frame(REQUEST, 3, b"bc")
        expected = [(REQUEST, 1, 0, b"a"), ("oversize", ERROR, 2, 10), (REQUEST, 3, 0, b"bc")]
        for cut in range(len(data) + 1):
            decoder = FrameDecoder(max_payload=5)
            self.assertEqual(feed_all(decoder, [data[:cut], data[cut:]]), expected, "cut %d" % cut)

    def test_consecutive_oversize(self):
        """Two oversize frames in a row are both reported and skipped."""
        decoder = FrameDecoder(max_payload=2)
        data = frame(REQUEST, 1, b"xxx") + frame(REQUEST, 2, b"yyyy") + frame(REQUEST, 3, b"zz")
        got = feed_all(decoder, chunked(data, 7))
        self.assertEqual(
            got, [("oversize", REQUEST, 1, 3), ("oversize", REQUEST, 2, 4), (REQUEST, 3, 0, b"zz")]
        )

    def test_default_cap(self):
        """The default cap is 64 MiB."""
        self.assertEqual(FrameDecoder().max_payload, 64 * 1024 * 1024)
        self.assertEqual(framing.DEFAULT_MAX_PAYLOAD, 64 * 1024 * 1024)
        self.assertEqual(defaults.MAX_MESSAGE_SIZE, 64 * 1024 * 1024)


class RecordingProtocol(FramedProtocol):
    """Records received frames; keeps the default frameTooLong."""

    def __init__(self):
        self.frames = []

    def frameReceived(self, kind, request_id, aux, payload):
        self.frames.append((kind, request_id, aux, payload))


class FramedProtocolTests(SynchronousTestCase):
    """FramedProtocol over a StringTransport."""

    def connect(self, protocol=None):
        protocol = protocol or RecordingProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_send_frame_round_trip(self):
        """sendFrame writes header + payload that decode back to the frame."""
        protocol, transport = self.connect()
        protocol.sendFrame(REQUEST, 123, b"some payload", aux=5000)
        written = transport.value()
        self.assertEqual(len(written), HEADER_SIZE + len(b"some payload"))
        self.assertEqual(FrameDecoder().feed(written), [(REQUEST, 123, 5000, b"some payload")])

    def test_send_empty_frame(self):
        """A frame without payload is the header alone."""
        protocol, transport = self.connect()
        protocol.sendFrame(CANCEL, 8)
        self.assertEqual(transport.value(), encode_header(CANCEL, 8, 0))
        self.assertEqual(FrameDecoder().feed(transport.value()), [(CANCEL, 8, 0, b"")])

    def test_send_several(self):
        """Several sent frames decode back in order."""
        protocol, transport = self.connect()
        for kind, request_id, aux, payload in FRAMES:
            protocol.sendFrame(kind, request_id, payload, aux=aux)
        self.assertEqual(transport.value(), ENCODED)

    def test_data_received(self):
        """dataReceived delivers frames split across reads to frameReceived."""
        protocol, _ = self.connect()
        for chunk in chunked(ENCODED, 9):
            protocol.dataReceived(chunk)
        self.assertEqual(protocol.frames, [(k, i, a, p) for k, i, a, p in FRAMES])

    def test_protocol_to_protocol(self):
        """What one protocol sends, another receives."""
        sender, sent = self.connect()
        receiver, _ = self.connect()
        sender.sendFrame(RESPONSE, 2**40, b"\x00" * 1000)
        receiver.dataReceived(sent.value())
        self.assertEqual(receiver.frames, [(RESPONSE, 2**40, 0, b"\x00" * 1000)])

    def test_frame_too_long_drops_connection(self):
        """By default an oversize frame loses the connection."""
        protocol = RecordingProtocol()
        protocol.max_payload = 4
        protocol, transport = self.connect(protocol)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(frame(REQUEST, 1, b"12345"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.frames, [])

    def test_frame_too_long_hook(self):
        """A subclass overriding frameTooLong gets (kind, id, length) and keeps going."""

        class Tolerant(RecordingProtocol):
            max_payload = 4

            def frameTooLong(self, kind, request_id, length):
                self.frames.append(("too long", kind, request_id, length))

        protocol, transport = self.connect(Tolerant())
        protocol.dataReceived(frame(REQUEST, 1, b"12345") + frame(REQUEST, 2, b"1234"))
        self.assertEqual(protocol.frames, [("too long", REQUEST, 1, 5), (REQUEST, 2, 0, b"1234")])
        self.assertFalse(transport.disconnecting)


class ReadSizeTests(SynchronousTestCase):
    def test_reads_grow_to_the_frame_in_progress(self):
        """While a large frame is half received, the transport is asked for the
        rest in one read; between frames it goes back to Twisted's 64 KiB."""
        from twisted.internet.testing import StringTransport

        from anyserve_tw.wire.framing import (
            READ_SIZE, REQUEST, FramedProtocol, encode_header,
        )

        received = []

        class Receiver(FramedProtocol):
            def frameReceived(self, kind, request_id, aux, payload):
                received.append(len(payload))

        protocol = Receiver()
        transport = StringTransport()
        protocol.makeConnection(transport)
        payload = b"x" * (1 << 20)
        protocol.dataReceived(encode_header(REQUEST, 1, len(payload)) + payload[:1000])
        self.assertEqual(transport.bufferSize, (1 << 20) - 1000)
        protocol.dataReceived(payload[1000:])
        self.assertEqual(received, [1 << 20])
        self.assertEqual(transport.bufferSize, READ_SIZE)


class SocketBufferTests(TestCase):
    """Real Unix sockets: both ends ask for wide kernel buffers, and a frame
    larger than any one buffer still arrives whole."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.path = self.mktemp()
        self.received = Deferred()
        self.accepted = []
        received, accepted = self.received, self.accepted

        class Receiver(FramedProtocol):
            def connectionMade(self):
                super().connectionMade()
                accepted.append(self)

            def frameReceived(self, kind, request_id, aux, payload):
                received.callback((kind, request_id, aux, payload))

        self.port = reactor.listenUNIX(self.path, Factory.forProtocol(Receiver))
        self.addCleanup(self.port.stopListening)

    def granted_for(self, size):
        """What this kernel grants a fresh Unix socket asking for ``size``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fresh:
            fresh.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            return fresh.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def assertWidened(self, transport):
        granted = transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.assertEqual(granted, self.granted_for(framing.SOCKET_BUFFER))
        self.assertEqual(transport.SEND_LIMIT, max(
            FileDescriptor.SEND_LIMIT, min(granted, framing.SOCKET_BUFFER)))

    @inlineCallbacks
    def test_large_frame_over_widened_socket(self):
        endpoint = UNIXClientEndpoint(self.reactor, self.path)
        sender = yield endpoint.connect(Factory.forProtocol(FramedProtocol))
        self.addCleanup(sender.transport.loseConnection)
        payload = os.urandom(3 * 1024 * 1024 + 7)
        sender.sendFrame(REQUEST, 9, payload, aux=250)
        kind, request_id, aux, got = yield self.received
        self.assertEqual((kind, request_id, aux, len(got)), (REQUEST, 9, 250, len(payload)))
        self.assertEqual(got, payload)
        self.assertWidened(sender.transport)
        self.assertWidened(self.accepted[0].transport)

    def test_transport_without_socket(self):
        """A fake transport is left alone."""
        transport = StringTransport()
        self.assertIsNone(framing.widen_socket_buffers(transport, framing.SOCKET_BUFFER))
        self.assertFalse(hasattr(transport, "SEND_LIMIT"))

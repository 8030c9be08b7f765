"""Tests for anyserve_tw.wire.framing: the ingress <-> worker frame format."""
import array
import errno
import os
import random
import socket

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyserve_tw.wire import defaults, framing
from anyserve_tw.wire.framing import (
    CANCEL,
    ERROR,
    FILL_READ_SIZE,
    HEADER_SIZE,
    LARGE_FRAME,
    READ_SIZE,
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
    def test_reads_shrink_while_a_large_frame_fills(self):
        """While a large frame fills in place, Twisted is asked for small reads
        (the rest is read into place); between frames and during small ones it
        goes back to its 64 KiB."""
        received = []

        class Receiver(FramedProtocol):
            def frameReceived(self, kind, request_id, aux, payload):
                received.append(len(payload))

        protocol = Receiver()
        transport = StringTransport()
        protocol.makeConnection(transport)
        payload = b"x" * (1 << 20)
        protocol.dataReceived(encode_header(REQUEST, 1, len(payload)) + payload[:1000])
        self.assertEqual(transport.bufferSize, FILL_READ_SIZE)
        protocol.dataReceived(payload[1000:])
        self.assertEqual(received, [1 << 20])
        self.assertEqual(transport.bufferSize, READ_SIZE)
        protocol.dataReceived(frame(REQUEST, 2, b"y" * 1000)[:500])
        self.assertEqual(transport.bufferSize, READ_SIZE)


class CountingAllocator:
    """Wraps framing.new_payload_buffer, remembering what it handed out."""

    def __init__(self, allocate=None):
        self.allocate = allocate or framing.new_payload_buffer
        self.payloads = []

    def __call__(self, size):
        payload, view = self.allocate(size)
        self.payloads.append(payload)
        return payload, view

    def handed_out(self, payload):
        return any(payload is p for p in self.payloads)


def bytearray_buffer(size):
    buf = bytearray(size)
    return buf, memoryview(buf)


class FillTests(SynchronousTestCase):
    """Large frames go into one buffer of their final size."""

    def test_in_place_bytes(self):
        """new_payload_buffer gives a bytes object written through its view."""
        payload, view = framing.new_payload_buffer(100000)
        self.assertIs(type(payload), bytes)
        self.assertEqual((len(payload), view.nbytes, view.readonly), (100000, 100000, False))
        view[:3] = b"abc"
        view[-2:] = b"yz"
        self.assertEqual((payload[:3], payload[-2:]), (b"abc", b"yz"))

    def test_in_place_view_keeps_its_bytes_alive(self):
        """The writable view holds a reference to its bytes: writing through
        it can never reach freed memory."""
        import sys

        payload, view = framing.new_payload_buffer(16)
        held = sys.getrefcount(payload)
        del view
        self.assertEqual(sys.getrefcount(payload), held - 1)
        self.assertRaises(ValueError, framing.new_payload_buffer, 0)

    def test_one_allocation_delivered_as_is(self):
        """A large payload in 64 KiB chunks is allocated once, at its size, and
        that very object is delivered, as bytes."""
        allocator = CountingAllocator()
        payload = os.urandom(3 * 1024 * 1024 + 11)
        data = frame(RESPONSE, 5, payload, aux=2) + frame(REQUEST, 6, b"next")
        decoder = FrameDecoder(allocate=allocator)
        got = feed_all(decoder, chunked(data, 64 * 1024))
        self.assertEqual(len(allocator.payloads), 1)
        self.assertEqual(len(allocator.payloads[0]), len(payload))
        self.assertEqual(got[0][:3], (RESPONSE, 5, 2))
        self.assertIs(got[0][3], allocator.payloads[0])
        self.assertIs(type(got[0][3]), bytes)
        self.assertTrue(got[0][3] == payload)
        self.assertEqual(got[1], (REQUEST, 6, 0, b"next"))
        self.assertFalse(decoder.filling)

    def test_small_frames_not_allocated(self):
        """Frames under the threshold, or complete when first seen, are sliced."""
        allocator = CountingAllocator()
        decoder = FrameDecoder(allocate=allocator)
        small = frame(REQUEST, 1, b"s" * (LARGE_FRAME - 1))
        whole = frame(REQUEST, 2, b"w" * (LARGE_FRAME + 5))
        got = feed_all(decoder, chunked(small, 1000) + [whole])
        self.assertEqual([len(p) for _, _, _, p in got], [LARGE_FRAME - 1, LARGE_FRAME + 5])
        self.assertEqual(allocator.payloads, [])

    def test_unfilled_and_filled(self):
        """What a socket would recv_into unfilled() completes the frame."""
        decoder = FrameDecoder(large=10)
        payload = bytes(range(100))
        data = frame(REQUEST, 3, payload, aux=9)
        self.assertEqual(decoder.feed(data[:HEADER_SIZE + 30]), [])
        self.assertTrue(decoder.filling)
        self.assertEqual(decoder.expecting, 70)
        view = decoder.unfilled()
        self.assertEqual(len(view), 70)
        view[:50] = payload[30:80]
        self.assertEqual(decoder.filled(50), [])
        self.assertEqual(decoder.expecting, 20)
        decoder.unfilled()[:] = payload[80:]
        self.assertEqual(decoder.filled(20), [(REQUEST, 3, 9, payload)])
        self.assertFalse(decoder.filling)
        self.assertIsNone(decoder.unfilled())
        self.assertEqual(decoder.expecting, 0)
        self.assertEqual(decoder.feed(frame(CANCEL, 4)), [(CANCEL, 4, 0, b"")])

    def test_split_anywhere_with_filling(self):
        """With every payload over the threshold, frames split anywhere (in
        two or byte by byte) still decode, with the right types and order."""
        for large in (1, 8):
            expected = [(k, i, a, p) for k, i, a, p in FRAMES]
            for cut in range(len(ENCODED) + 1):
                decoder = FrameDecoder(large=large)
                got = feed_all(decoder, [ENCODED[:cut], ENCODED[cut:]])
                self.assertEqual(got, expected, "large %d, split at %d" % (large, cut))
            decoder = FrameDecoder(large=large)
            got = feed_all(decoder, [ENCODED[i:i + 1] for i in range(len(ENCODED))])
            self.assertEqual(got, expected)
            self.assertEqual(decoder._buffered, 0)

    def test_fill_ends_mid_chunk(self):
        """The chunk finishing a filled frame also holds whole frames and the
        start of another; none of it is lost or copied out of order."""
        decoder = FrameDecoder(large=16, allocate=bytearray_buffer)
        big = bytes(range(200))
        data = frame(REQUEST, 1, big) + frame(CANCEL, 2) + frame(RESPONSE, 3, b"abc") + frame(REQUEST, 4, big)
        first = HEADER_SIZE + 50
        got = decoder.feed(data[:first])
        self.assertEqual(got, [])
        got = decoder.feed(data[first:-30])
        self.assertEqual(got, [(REQUEST, 1, 0, bytearray(big)), (CANCEL, 2, 0, b""), (RESPONSE, 3, 0, b"abc")])
        self.assertIsInstance(got[0][3], bytearray)
        self.assertEqual(decoder.feed(data[-30:]), [(REQUEST, 4, 0, big)])

    def test_oversize_never_allocated(self):
        """An oversize frame is skipped, not given a buffer."""
        allocator = CountingAllocator()
        decoder = FrameDecoder(max_payload=LARGE_FRAME * 2, allocate=allocator)
        data = frame(REQUEST, 1, b"o" * (LARGE_FRAME * 2 + 1)) + frame(REQUEST, 2, b"k" * LARGE_FRAME * 2)
        got = feed_all(decoder, chunked(data, 4096))
        self.assertEqual(got[0], ("oversize", REQUEST, 1, LARGE_FRAME * 2 + 1))
        self.assertEqual(got[1][:2], (REQUEST, 2))
        self.assertEqual(len(allocator.payloads), 1)
        self.assertIs(got[1][3], allocator.payloads[0])

    def test_without_in_place_bytes(self):
        """Off CPython, large frames are joined once, as bytes."""
        self.patch(framing, "new_payload_buffer", None)
        payload = os.urandom(LARGE_FRAME * 3)
        got = feed_all(FrameDecoder(), chunked(frame(REQUEST, 1, payload), 5000))
        self.assertEqual(got, [(REQUEST, 1, 0, payload)])
        self.assertIs(type(got[0][3]), bytes)


class PayloadPartsTests(SynchronousTestCase):
    def test_parts_and_length(self):
        """Parts are flat byte views; empty ones are dropped; sizes are bytes."""
        ints = array.array("i", range(10))
        parts = framing.payload_parts([b"ab", memoryview(ints), b"", bytearray(b"c")])
        self.assertEqual([bytes(p) for p in parts], [b"ab", ints.tobytes(), b"c"])
        self.assertEqual(framing.payload_length((b"ab", ints, bytearray(3))), 2 + 40 + 3)
        self.assertEqual(framing.payload_length(ints), 40)
        self.assertEqual(framing.payload_parts(b""), [])

    def test_send_parts_over_string_transport(self):
        """A list of parts, sent where Twisted must buffer, is the joined frame."""
        protocol = RecordingProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        ints = array.array("i", [7, 8])
        protocol.sendFrame(RESPONSE, 4, [b"head", memoryview(ints), bytearray(b"!")], aux=1)
        protocol.sendFrame(RESPONSE, 5, (b"t", b"u"))
        self.assertEqual(
            transport.value(),
            frame(RESPONSE, 4, b"head" + ints.tobytes() + b"!", aux=1) + frame(RESPONSE, 5, b"tu"),
        )


class FakeSocket:
    """sendmsg() takes at most ``room`` bytes, or fails with ``error``."""

    def __init__(self, room, error=None):
        self.room = room
        self.error = error
        self.taken = b""
        self.calls = 0

    def sendmsg(self, buffers, ancdata=(), flags=0):
        self.calls += 1
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        data = b"".join(buffers)[:self.room]
        if not data and self.room == 0:
            raise BlockingIOError(errno.EAGAIN, "would block")
        self.room -= len(data)
        self.taken += data
        return len(data)


class SendPartsTests(SynchronousTestCase):
    PIECES = [b"header", memoryview(b"payload"), b"", b"tail"]

    def test_every_cut(self):
        """Whatever the kernel takes, taken + returned rest is the whole."""
        whole = b"".join(self.PIECES)
        for room in range(len(whole) + 1):
            sock = FakeSocket(room)
            rest = framing.send_parts(sock, list(self.PIECES))
            self.assertEqual(sock.taken + b"".join(rest), whole, "room %d" % room)
            self.assertEqual(rest == [], room == len(whole))

    def test_untouched_rest_is_the_same_objects(self):
        """Pieces the kernel did not start on are returned, not copied."""
        tail = b"tail" * 10
        rest = framing.send_parts(FakeSocket(3), [b"header", tail])
        self.assertEqual(bytes(rest[0]), b"der")
        self.assertIs(rest[1], tail)

    def test_batches_of_iov_max(self):
        """More pieces than one sendmsg() takes go in several calls."""
        self.patch(framing, "IOV_MAX", 2)
        sock = FakeSocket(100)
        self.assertEqual(framing.send_parts(sock, [b"a", b"b", b"c", b"d", b"e"]), [])
        self.assertEqual((sock.taken, sock.calls), (b"abcde", 3))

    def test_errors_leave_everything_to_twisted(self):
        """A full socket or a broken one: all is returned for Twisted to send
        (or to fail on)."""
        for error in (errno.EAGAIN, errno.ENOBUFS, errno.EPIPE, errno.ECONNRESET):
            pieces = [b"header", b"body"]
            rest = framing.send_parts(FakeSocket(100, error), list(pieces))
            self.assertEqual(rest, pieces)


class SpySocket:
    """Counts what a protocol sends and reads on its socket directly."""

    def __init__(self, sock):
        self.sock = sock
        self.sendmsg_calls = 0
        self.sent = 0
        self.received = 0

    def sendmsg(self, buffers, *args):
        self.sendmsg_calls += 1
        n = self.sock.sendmsg(buffers, *args)
        self.sent += n
        return n

    def recv_into(self, buffer):
        n = self.sock.recv_into(buffer)
        self.received += n
        return n


class Peer(FramedProtocol):
    """Records frames (and oversize notices); fires ``lost`` when closed."""

    def __init__(self):
        self.frames = []
        self.lost = Deferred()
        self._waiting = None

    def connectionMade(self):
        super().connectionMade()
        self.spy = self._socket = SpySocket(self._socket)

    def frameReceived(self, kind, request_id, aux, payload):
        self.frames.append((kind, request_id, aux, payload))
        self._check()

    def frameTooLong(self, kind, request_id, length):
        self.frames.append(("too long", kind, request_id, length))
        self._check()

    def _check(self):
        if self._waiting is not None and len(self.frames) >= self._waiting[0]:
            d = self._waiting[1]
            self._waiting = None
            d.callback(self.frames)

    def received(self, count):
        """A Deferred firing once ``count`` frames have arrived."""
        d = Deferred()
        self._waiting = (count, d)
        self._check()
        return d

    def connectionLost(self, reason):
        self.lost.callback(None)


def twisted_buffered(transport):
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class SocketPairTests(TestCase):
    """Two FramedProtocols over a real Unix socketpair."""

    def connect(self, sender=None, receiver=None):
        from twisted.internet import reactor

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        peers = []
        for sock, peer in ((a, sender or Peer()), (b, receiver or Peer())):
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: peer))
            sock.close()  # the transport holds its own duplicate
            self.addCleanup(lambda p=peer: (p.transport.abortConnection(), p.lost)[1])
            peers.append(peer)
        return peers

    def payload(self, size):
        return random.Random(size).randbytes(size)

    @inlineCallbacks
    def until(self, condition, timeout=10.0):
        """Let the reactor run until ``condition()`` holds."""
        from twisted.internet import reactor

        waited = 0.0
        while not condition():
            self.assertLess(waited, timeout, "condition never held")
            yield deferLater(reactor, 0.005, lambda: None)
            waited += 0.005

    @inlineCallbacks
    def test_large_frame_direct_both_ways(self):
        """A 1 MiB frame goes out with one sendmsg() and nothing left in
        Twisted's buffer, and comes in read into the one buffer delivered."""
        allocator = CountingAllocator()
        self.patch(framing, "new_payload_buffer", allocator)
        sender, receiver = self.connect()
        granted = sender.transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        size = min(1 << 20, granted // 4)  # room to spare on hosts with small buffers
        payload = self.payload(size)
        sender.sendFrame(REQUEST, 1, payload, aux=3)
        self.assertEqual(twisted_buffered(sender.transport), 0)
        self.assertEqual((sender.spy.sendmsg_calls, sender.spy.sent), (1, HEADER_SIZE + size))
        frames = yield receiver.received(1)
        self.assertEqual(frames[0][:3], (REQUEST, 1, 3))
        self.assertTrue(frames[0][3] == payload)
        self.assertEqual(len(allocator.payloads), 1)
        self.assertIs(frames[0][3], allocator.payloads[0])
        # Beyond Twisted's first read, all of it was read into place.
        self.assertGreaterEqual(receiver.spy.received, size + HEADER_SIZE - READ_SIZE)

    @inlineCallbacks
    def test_queued_bytes_go_first(self):
        """Bytes Twisted holds unsent go before a frame sent after them."""
        sender, receiver = self.connect()
        sender.transport.write(frame(REQUEST, 1, b"queued"))
        sender.sendFrame(REQUEST, 2, self.payload(LARGE_FRAME * 4))
        sender.sendFrame(REQUEST, 3, [b"a", b"b"])
        self.assertEqual(sender.spy.sendmsg_calls, 0)
        frames = yield receiver.received(3)
        self.assertEqual([f[1] for f in frames], [1, 2, 3])
        self.assertTrue(frames[1][3] == self.payload(LARGE_FRAME * 4))
        self.assertEqual(frames[2][3], b"ab")
        sender.sendFrame(REQUEST, 4, b"direct again")
        self.assertEqual(sender.spy.sendmsg_calls, 1)
        frames = yield receiver.received(4)
        self.assertEqual(frames[3], (REQUEST, 4, 0, b"direct again"))

    @inlineCallbacks
    def test_partly_written_bytes_go_first(self):
        """Bytes Twisted has started writing, and holds only in its byte
        buffer, also go before a frame sent after them."""
        from twisted.internet import reactor

        class Narrow(Peer):
            socket_buffer = 16 * 1024

        sender = Narrow()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(b.close)
        reactor.adoptStreamConnection(a.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: sender))
        a.close()
        self.addCleanup(lambda: (sender.transport.abortConnection(), sender.lost)[1])
        b.setblocking(False)
        received = []

        def drain(limit):
            while limit > 0:
                try:
                    data = b.recv(min(limit, 65536))
                except BlockingIOError:
                    return
                received.append(data)
                limit -= len(data)

        big = self.payload(1 << 20)
        sender.sendFrame(REQUEST, 1, big)
        self.assertGreater(sender.transport._tempDataLen, 0)
        # Room for more (not for all): Twisted moves what the socket did not
        # take into its byte buffer, writes some of it, and holds the rest there.
        drain(1 << 30)
        yield self.until(lambda: not sender.transport._tempDataLen)
        self.assertGreater(len(sender.transport.dataBuffer) - sender.transport.offset, 0)
        calls = sender.spy.sendmsg_calls
        sender.sendFrame(REQUEST, 2, b"after")
        self.assertEqual(sender.spy.sendmsg_calls, calls)
        expected = [(REQUEST, 1, 0, big), (REQUEST, 2, 0, b"after")]
        total = sum(HEADER_SIZE + len(p) for _, _, _, p in expected)

        def everything():
            drain(1 << 30)
            return sum(len(data) for data in received) >= total

        yield self.until(everything)
        self.assertEqual(FrameDecoder().feed(b"".join(received)), expected)

    @inlineCallbacks
    def test_every_size_in_order_through_full_buffers(self):
        """Frames of every size and payload form, sent while the receiver is
        not reading and the sender's kernel buffer is small, so that sends are
        direct, partial, and behind Twisted's buffer in turn: all arrive whole
        and in order, every large one in its own single buffer."""
        allocator = CountingAllocator()
        self.patch(framing, "new_payload_buffer", allocator)

        class Narrow(Peer):
            socket_buffer = 16 * 1024

        sender, receiver = self.connect(Narrow())
        receiver.transport.pauseProducing()
        rng = random.Random(7)
        sizes = [0, 1, HEADER_SIZE - 1, HEADER_SIZE, 4095, LARGE_FRAME - 1, LARGE_FRAME,
                 LARGE_FRAME + 1, 100000, 1 << 20, 3 * (1 << 20) + 5]
        sizes += [rng.choice([rng.randrange(0, 300), rng.randrange(0, 3 << 20)]) for _ in range(30)]
        expected = []
        direct = []
        for request_id, size in enumerate(sizes):
            payload = self.payload(size)
            form = request_id % 5
            if form == 0:
                sent = payload
            elif form == 1:
                sent = bytearray(payload)
            elif form == 2:
                sent = memoryview(payload)
            else:
                cut1, cut2 = sorted((rng.randrange(size + 1), rng.randrange(size + 1)))
                sent = [payload[:cut1], memoryview(bytearray(payload[cut1:cut2])), payload[cut2:]]
                if form == 4:
                    sent = tuple(sent)
            calls = sender.spy.sendmsg_calls
            sender.sendFrame(RESPONSE, request_id, sent, aux=size % 1000)
            direct.append(sender.spy.sendmsg_calls > calls)
            expected.append((RESPONSE, request_id, size % 1000, payload))
        # The first frames went straight to the kernel, later ones queued
        # behind what it could not take.
        self.assertTrue(direct[0])
        self.assertFalse(all(direct))
        self.assertGreater(twisted_buffered(sender.transport), 0)
        receiver.transport.resumeProducing()
        frames = yield receiver.received(len(expected))
        self.assertEqual(len(frames), len(expected))
        for got, want in zip(frames, expected):
            self.assertEqual(got[:3], want[:3])
            self.assertTrue(got[3] == want[3], "frame %d differs" % want[1])
            self.assertIs(type(got[3]), bytes)
            self.assertEqual(allocator.handed_out(got[3]), len(want[3]) >= LARGE_FRAME,
                             "frame %d of %d bytes" % (want[1], len(want[3])))
        self.assertEqual(len(allocator.payloads), len([s for s in sizes if s >= LARGE_FRAME]))
        # Once Twisted's buffer drained, sends are direct again.
        yield self.until(lambda: not twisted_buffered(sender.transport))
        calls = sender.spy.sendmsg_calls
        sender.sendFrame(REQUEST, 99, b"last")
        self.assertEqual(sender.spy.sendmsg_calls, calls + 1)
        frames = yield receiver.received(len(expected) + 1)
        self.assertEqual(frames[-1], (REQUEST, 99, 0, b"last"))

    @inlineCallbacks
    def test_oversize_skipped_over_socket(self):
        """A frame over the receiver's cap fails alone, without a buffer."""
        allocator = CountingAllocator()
        self.patch(framing, "new_payload_buffer", allocator)

        class Capped(Peer):
            max_payload = 200000

        sender, receiver = self.connect(receiver=Capped())
        sender.sendFrame(REQUEST, 1, self.payload(200001))
        sender.sendFrame(REQUEST, 2, self.payload(200000))
        sender.sendFrame(REQUEST, 3, self.payload(3 << 20))
        sender.sendFrame(REQUEST, 4, b"small")
        frames = yield receiver.received(4)
        self.assertEqual(frames[0], ("too long", REQUEST, 1, 200001))
        self.assertEqual(frames[1][:2], (REQUEST, 2))
        self.assertTrue(frames[1][3] == self.payload(200000))
        self.assertEqual(frames[2], ("too long", REQUEST, 3, 3 << 20))
        self.assertEqual(frames[3], (REQUEST, 4, 0, b"small"))
        self.assertEqual(len(allocator.payloads), 1)
        self.assertIs(frames[1][3], allocator.payloads[0])

    @inlineCallbacks
    def test_memory_per_frame(self):
        """Counted by tracemalloc: sending a large frame, as bytes or parts,
        allocates nothing of its size; receiving it allocates it once, plus
        Twisted's first read (the old join needed the reads and the join)."""
        import tracemalloc

        sender, receiver = self.connect()
        granted = sender.transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        size = min(1 << 20, granted // 4)
        payload = self.payload(size)
        parts = [payload[:1000], memoryview(payload)[1000:]]
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        base = tracemalloc.get_traced_memory()[0]
        sender.sendFrame(REQUEST, 1, payload)
        sender.sendFrame(REQUEST, 2, parts)
        self.assertLess(tracemalloc.get_traced_memory()[1] - base, size // 4)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        frames = yield receiver.received(2)
        peak = tracemalloc.get_traced_memory()[1] - base
        self.assertTrue(frames[0][3] == payload and frames[1][3] == payload)
        self.assertLess(peak, 2 * size + 2 * READ_SIZE)

    def test_stream_socket(self):
        """Only Twisted's own socket transports are bypassed."""
        sender, receiver = self.connect()
        self.assertIs(framing.stream_socket(sender.transport), sender.transport.getHandle())
        self.assertIsNone(framing.stream_socket(StringTransport()))
        # A Twisted whose private buffer state looks different gets no bypass.
        del sender.transport._tempDataLen
        self.assertIsNone(framing.stream_socket(sender.transport))
        sender.transport._tempDataLen = 0


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

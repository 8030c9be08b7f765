"""The frame format spoken between the ingress and its workers.

Every message is a fixed 20-byte header followed by ``length`` payload bytes::

    offset size  field
    0      4     length      payload bytes after the header (u32, big-endian)
    4      1     type        REQUEST=1 RESPONSE=2 ERROR=3 CANCEL=4
    5      1     flags       0 (reserved)
    6      2     reserved    0
    8      8     request id  chosen by the ingress, unique per connection (u64)
    16     4     aux         REQUEST: timeout in ms (0 = none)
                             ERROR: gRPC status code; otherwise 0

Payloads: REQUEST carries serialized ``inference.ModelInferRequest`` bytes as
the client sent them; RESPONSE the serialized ``ModelInferResponse``; ERROR a
UTF-8 message; CANCEL nothing (the ingress gave up on that request id).

Many requests are in flight on one connection; responses may come back in any
order.  A frame longer than the receiver's cap is skipped without buffering
and reported through :meth:`FramedProtocol.frameTooLong`, so one oversize
message fails one request and not the whole connection.

Twisted's ``Int32StringReceiver`` is not used: it caps frames at 99,999 bytes
and re-copies its growing buffer, while tensors need megabytes copied once.
"""
import socket
import struct
from collections import deque

from twisted.internet.protocol import Protocol

from anyserve_tw.wire.defaults import MAX_MESSAGE_SIZE

HEADER = struct.Struct("!IBBHQI")
HEADER_SIZE = HEADER.size

REQUEST = 1
RESPONSE = 2
ERROR = 3
CANCEL = 4

KIND_NAMES = {REQUEST: "REQUEST", RESPONSE: "RESPONSE", ERROR: "ERROR", CANCEL: "CANCEL"}

#: Twisted's default read size, and the most one read may ask for.
READ_SIZE = 64 * 1024
MAX_READ_SIZE = 4 * 1024 * 1024

#: Kernel buffer asked for on each ingress-worker connection.  With Linux's
#: default (~208 KiB) and Twisted's 128 KiB ``SEND_LIMIT``, a 2 MiB request
#: went out in 16 writes and came in over as many reads, each a reactor
#: iteration of its own, on both ends; with 4 MiB it is one write and one or
#: two reads (2 x 1 MiB bench case: 202-234 -> 269-291 req/s, A/B pairs).
#: Linux grants twice what it is asked, but at most twice
#: ``net.core.wmem_max`` (often 212992: then a 2 MiB frame takes ~5 writes).
SOCKET_BUFFER = 4 * 1024 * 1024

#: Default cap on one payload: the same as the gRPC message limit.
DEFAULT_MAX_PAYLOAD = MAX_MESSAGE_SIZE


def encode_header(kind, request_id, length, aux=0):
    return HEADER.pack(length, kind, 0, 0, request_id, aux)


class FrameDecoder:
    """Incremental decoder: feed it bytes, get back complete frames.

    Received chunks are kept as they arrived and each frame's bytes are joined
    exactly once, so a multi-megabyte payload costs one copy however many reads
    it arrived in, and a read holding many small frames is sliced, not re-copied.
    """

    def __init__(self, max_payload=DEFAULT_MAX_PAYLOAD):
        self.max_payload = max_payload
        self._chunks = deque()
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._buffered = 0  # bytes held beyond _offset
        self._header = None  # (kind, request_id, aux, length) of the frame in progress
        self._skipping = 0  # bytes of an oversize payload still to throw away

    def _take(self, n):
        """Remove and return the next ``n`` buffered bytes (n <= buffered)."""
        first = self._chunks[0]
        end = self._offset + n
        if end <= len(first):
            if self._offset == 0 and end == len(first):
                data = first
            else:
                data = first[self._offset:end]
            if end == len(first):
                self._chunks.popleft()
                self._offset = 0
            else:
                self._offset = end
            self._buffered -= n
            return data
        parts = []
        remaining = n
        while remaining:
            chunk = self._chunks[0]
            available = len(chunk) - self._offset
            if available <= remaining:
                parts.append(chunk[self._offset:] if self._offset else chunk)
                self._chunks.popleft()
                self._offset = 0
                remaining -= available
            else:
                parts.append(chunk[self._offset:self._offset + remaining])
                self._offset += remaining
                remaining = 0
        self._buffered -= n
        return b"".join(parts)

    def _drop(self, n):
        """Discard up to ``n`` buffered bytes; return how many were dropped."""
        dropped = 0
        while dropped < n and self._chunks:
            chunk = self._chunks[0]
            available = len(chunk) - self._offset
            step = min(available, n - dropped)
            dropped += step
            if step == available:
                self._chunks.popleft()
                self._offset = 0
            else:
                self._offset += step
        self._buffered -= dropped
        return dropped

    @property
    def expecting(self):
        """Bytes still missing from the frame in progress (0 between frames)."""
        if self._header is None:
            return 0
        return self._header[3] - self._buffered

    def feed(self, data):
        """Add ``data``; return a list of ``(kind, request_id, aux, payload)``
        frames and ``("oversize", kind, request_id, length)`` notices."""
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
        out = []
        while True:
            if self._skipping:
                self._skipping -= self._drop(self._skipping)
                if self._skipping:
                    return out
            if self._header is None:
                if self._buffered < HEADER_SIZE:
                    return out
                length, kind, _flags, _reserved, request_id, aux = HEADER.unpack(
                    self._take(HEADER_SIZE)
                )
                if length > self.max_payload:
                    out.append(("oversize", kind, request_id, length))
                    self._skipping = length
                    continue
                self._header = (kind, request_id, aux, length)
            kind, request_id, aux, length = self._header
            if self._buffered < length:
                return out
            self._header = None
            out.append((kind, request_id, aux, self._take(length) if length else b""))


def widen_socket_buffers(transport, size):
    """Ask the kernel for ``size``-byte buffers on ``transport``'s socket and
    let one write hand it up to ``size`` bytes.  Returns the granted send
    buffer, or None for a transport without a socket (tests' fakes)."""
    get_handle = getattr(transport, "getHandle", None)
    sock = get_handle() if get_handle is not None else None
    if not isinstance(sock, socket.socket):
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return None
    # Twisted's FileDescriptor reads SEND_LIMIT from the instance, so it may be
    # raised per transport.  It also bounds how much unsent data doWrite joins
    # at once, so it stays at ``size`` even where the kernel granted more.
    limit = getattr(transport, "SEND_LIMIT", None)
    if limit is not None:
        transport.SEND_LIMIT = max(limit, min(granted, size))
    return granted


class FramedProtocol(Protocol):
    """A Protocol speaking AnyServe frames; subclasses implement the hooks."""

    max_payload = DEFAULT_MAX_PAYLOAD
    socket_buffer = SOCKET_BUFFER

    def connectionMade(self):
        self._decoder = FrameDecoder(self.max_payload)
        widen_socket_buffers(self.transport, self.socket_buffer)

    def dataReceived(self, data):
        for item in self._decoder.feed(data):
            if item[0] == "oversize":
                self.frameTooLong(*item[1:])
            else:
                self.frameReceived(*item)
        # Size the next read to the rest of a large frame in progress: fewer,
        # larger reads of a tensor (worker CPU on 2 x 1 MiB requests, read
        # straight off its socket: ~1.94 -> ~1.76 ms over four A/B pairs).
        self.transport.bufferSize = min(max(self._decoder.expecting, READ_SIZE), MAX_READ_SIZE)

    def sendFrame(self, kind, request_id, payload=b"", aux=0):
        header = encode_header(kind, request_id, len(payload), aux)
        if payload:
            self.transport.writeSequence((header, payload))
        else:
            self.transport.write(header)

    def frameReceived(self, kind, request_id, aux, payload):
        raise NotImplementedError

    def frameTooLong(self, kind, request_id, length):
        """A frame over ``max_payload`` was skipped; default: drop the connection."""
        self.transport.loseConnection()

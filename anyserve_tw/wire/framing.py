"""The frame format spoken between the ingress and its workers.

Every message is a fixed 20-byte header followed by ``length`` payload bytes::

    offset size  field
    0      4     length      payload bytes after the header (u32, big-endian)
    4      1     type        one of the kinds below
    5      1     flags       0 (reserved)
    6      2     reserved    0
    8      8     request id  chosen by the ingress, unique per connection (u64)
    16     4     aux         REQUEST, STREAM_REQUEST, HTTP_REQUEST: timeout
                             in ms (0 = none); ERROR: gRPC status code;
                             RESPONSE to HTTP_REQUEST: length of its JSON
                             part; otherwise 0

The kinds and their payloads:

- ``REQUEST`` (ingress -> worker): serialized ``inference.ModelInferRequest``
  bytes as the client sent them, answered by one RESPONSE or ERROR;
- ``STREAM_REQUEST``: the same, from a ModelStreamInfer stream: the worker
  may answer with any number of PARTIAL frames before its RESPONSE or ERROR;
- ``HTTP_REQUEST``: a REST inference, see :mod:`anyserve_tw.wire.payloads`;
  the RESPONSE carries the HTTP body (JSON, then any binary outputs);
- ``RESPONSE`` (worker -> ingress): the serialized ``ModelInferResponse``;
  it ends the request.  An empty RESPONSE to a STREAM_REQUEST ends it with
  nothing more to send;
- ``PARTIAL``: one ``ModelInferResponse`` of several; the request goes on;
- ``ERROR``: a UTF-8 message; it ends the request;
- ``TIMING``: the worker's own times for a request, sent just before its
  final RESPONSE (:class:`anyserve_tw.wire.payloads.Timing`);
- ``CANCEL`` (ingress -> worker): nothing; the ingress gave up on that id;
- ``SHM_TABLE`` (ingress -> worker, request id 0): the system shared-memory
  regions clients registered, replacing the previous table; sent on every
  connection whenever the table changes and when a connection opens, so
  it always precedes the requests that name them.

Many requests are in flight on one connection; responses may come back in any
order.  A frame longer than the receiver's cap is skipped without buffering
and reported through :meth:`FramedProtocol.frameTooLong`, so one oversize
message fails one request and not the whole connection.

Twisted's ``Int32StringReceiver`` is not used: it caps frames at 99,999 bytes
and re-copies its growing buffer, while tensors need megabytes copied once.

Tensors are copied in user space only where the kernel or grpcio need it.  A
frame goes out with one ``sendmsg()`` of its header and payload parts, joined
by no one, whenever Twisted holds nothing unsent ahead of it.  A large frame is
read with ``recv_into()`` straight into a ``bytes`` object of its final size,
which is what is delivered: grpcio takes nothing but ``bytes``.
"""
import ctypes
import errno
import os
import socket
import struct
from collections import deque

from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Protocol

from anyserve_tw.wire.defaults import MAX_MESSAGE_SIZE

HEADER = struct.Struct("!IBBHQI")
HEADER_SIZE = HEADER.size

REQUEST = 1
RESPONSE = 2
ERROR = 3
CANCEL = 4
TIMING = 5
STREAM_REQUEST = 6
PARTIAL = 7
HTTP_REQUEST = 8
SHM_TABLE = 9

KIND_NAMES = {REQUEST: "REQUEST", RESPONSE: "RESPONSE", ERROR: "ERROR", CANCEL: "CANCEL",
              TIMING: "TIMING", STREAM_REQUEST: "STREAM_REQUEST", PARTIAL: "PARTIAL",
              HTTP_REQUEST: "HTTP_REQUEST", SHM_TABLE: "SHM_TABLE"}

#: The kinds that start a request on the worker.
REQUEST_KINDS = (REQUEST, STREAM_REQUEST, HTTP_REQUEST)

#: Twisted's default read size, used between frames.
READ_SIZE = 64 * 1024

#: Frames at least this long are received into one buffer of their final
#: size; shorter ones are sliced out of the reads they came in.
LARGE_FRAME = 64 * 1024

#: Twisted's read size while a large frame fills: the rest of the frame is
#: read in place, so what Twisted reads is the only part copied twice.
FILL_READ_SIZE = 4 * 1024

#: Most buffers one sendmsg() takes.
try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (AttributeError, ValueError, OSError):
    IOV_MAX = 1024
if IOV_MAX <= 1:
    IOV_MAX = 1024

_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)

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


def encode_frame(kind, request_id, payload=b"", aux=0):
    """A whole small frame as bytes, e.g. to go ahead of another in one write."""
    return HEADER.pack(len(payload), kind, 0, 0, request_id, aux) + payload


def _byte_view(part):
    """``part`` as bytes, bytearray or a flat byte memoryview, so that ``len``
    is its size in bytes and slices cut at byte offsets."""
    if type(part) is bytes or type(part) is bytearray:
        return part
    view = memoryview(part)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def payload_parts(payload):
    """The non-empty parts of a payload given as one bytes-like object or a
    list/tuple of them, each as :func:`_byte_view` makes it."""
    if isinstance(payload, (list, tuple)):
        parts = [_byte_view(p) for p in payload]
        return [p for p in parts if len(p)]
    part = _byte_view(payload)
    return [part] if len(part) else []


def payload_length(payload):
    """Bytes a payload (bytes-like or list/tuple of parts) puts on the wire."""
    return sum(len(p) for p in payload_parts(payload))


def _in_place_bytes():
    """Build ``bytes`` in place, as C extensions do: CPython documents that
    an object from ``PyBytes_FromStringAndSize(NULL, n)`` may be written
    through ``PyBytes_AsString()`` until it is shared.  None where the C API
    is not reachable (not CPython)."""
    try:
        api = ctypes.pythonapi
        new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)(
            ("PyBytes_FromStringAndSize", api))
        address = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object)(("PyBytes_AsString", api))
    except (AttributeError, OSError):
        return None

    def new_payload_buffer(size):
        """A fresh ``bytes`` of ``size`` (at least 1) unset bytes and a
        writable view of them, which keeps the ``bytes`` alive."""
        if size < 1:
            raise ValueError("in-place bytes need a size of at least 1")
        payload = new(None, size)
        memory = (ctypes.c_char * size).from_address(address(payload))
        memory.owner = payload  # the view holds memory, memory holds payload
        return payload, memoryview(memory).cast("B")

    return new_payload_buffer


#: ``new_payload_buffer(size) -> (payload, writable byte view)``, or None.
new_payload_buffer = _in_place_bytes()


class FrameDecoder:
    """Incremental decoder: feed it bytes, get back complete frames.

    A frame shorter than ``large`` is sliced out of the chunk it arrived in,
    or joined once from several.  A longer one that is still incomplete gets
    its payload object at once (``allocate(length)``, by default a ``bytes``
    built in place); what arrived is copied in and the rest is written into
    place as it comes, by :meth:`feed`, or by a socket's ``recv_into()`` of
    :meth:`unfilled` followed by :meth:`filled`.  Payloads are ``bytes``
    unless ``allocate`` makes something else.
    """

    def __init__(self, max_payload=DEFAULT_MAX_PAYLOAD, large=LARGE_FRAME, allocate=None):
        self.max_payload = max_payload
        self.large = large
        self._allocate = allocate if allocate is not None else new_payload_buffer
        self._chunks = deque()
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._buffered = 0  # bytes held beyond _offset
        self._header = None  # (kind, request_id, aux, length) of the frame in progress
        self._skipping = 0  # bytes of an oversize payload still to throw away
        self._payload = None  # the large frame's payload object, being filled
        self._view = None  # writable view of its bytes not yet arrived

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

    def _start_filling(self, length):
        """Give the frame in progress its payload object and move what has
        arrived of it (everything buffered) into place."""
        payload, view = self._allocate(length)
        filled = 0
        while self._chunks:
            chunk = self._chunks.popleft()
            if self._offset:
                chunk = memoryview(chunk)[self._offset:]
                self._offset = 0
            view[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        self._buffered = 0
        self._payload = payload
        self._view = view[filled:]

    def _finish_filling(self):
        kind, request_id, aux, _ = self._header
        payload = self._payload
        self._header = self._payload = self._view = None
        return (kind, request_id, aux, payload)

    @property
    def filling(self):
        """True while a large frame waits for more bytes in its own buffer."""
        return self._view is not None

    def unfilled(self):
        """A writable view of the bytes the filling frame still lacks, in
        order, for ``recv_into()``; report what was written with :meth:`filled`."""
        return self._view

    def filled(self, n):
        """``n`` bytes were written at the start of :meth:`unfilled`; returns
        the list of frames this completed (the filling one, or none)."""
        view = self._view
        if n < len(view):
            self._view = view[n:]
            return []
        return [self._finish_filling()]

    @property
    def expecting(self):
        """Bytes still missing from the frame in progress (0 between frames)."""
        if self._view is not None:
            return len(self._view)
        if self._header is None:
            return 0
        return self._header[3] - self._buffered

    def feed(self, data):
        """Add ``data``; return a list of ``(kind, request_id, aux, payload)``
        frames and ``("oversize", kind, request_id, length)`` notices."""
        out = []
        if data:
            view = self._view
            if view is None:
                self._chunks.append(data)
                self._buffered += len(data)
            elif len(data) < len(view):
                view[:len(data)] = data
                self._view = view[len(data):]
                return out
            else:
                n = len(view)
                view[:] = data if n == len(data) else memoryview(data)[:n]
                out.append(self._finish_filling())
                if n < len(data):
                    self._chunks.append(data)
                    self._offset = n
                    self._buffered = len(data) - n
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
                if length >= self.large and self._allocate is not None:
                    self._start_filling(length)
                return out
            self._header = None
            out.append((kind, request_id, aux, self._take(length) if length else b""))


#: The parts of Twisted's FileDescriptor that say whether it holds unsent
#: bytes.  They are private: a Twisted without them gets no direct writes.
_BUFFER_STATE = ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected",
                 "producerPaused", "connected", "disconnecting")


def stream_socket(transport):
    """The socket under ``transport`` when that is Twisted's own socket
    transport, whose buffers frames may bypass; None for anything else
    (TLS, wrappers, tests' fakes, a Twisted whose buffers look different)."""
    if (not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False)
            or not all(hasattr(transport, name) for name in _BUFFER_STATE)):
        return None
    sock = getattr(transport, "socket", None)
    if isinstance(sock, socket.socket) and sock.type == socket.SOCK_STREAM:
        return sock
    return None


def unsent_bytes(transport):
    """Bytes Twisted holds unsent for ``transport`` (0 for one without
    Twisted's buffers, such as a test's fake)."""
    return (len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0))


def _writes_through(transport):
    """True when a write now would go straight to the socket: the connection
    is open and Twisted holds no unsent bytes that must go first."""
    return (transport.connected and not transport.disconnecting
            and not transport._writeDisconnected and not getattr(transport, "_aborting", False)
            and not transport.producerPaused and not getattr(transport, "TLS", False)
            and not unsent_bytes(transport))


def write_through(transport, sock, parts):
    """Write ``parts`` (bytes-like) to ``transport``: straight to ``sock``,
    its socket (:func:`stream_socket`; None if it has none we may use), in
    this call, when Twisted holds nothing unsent; else, and for what the
    kernel did not take, through Twisted's buffer, which keeps the order."""
    if sock is not None and _writes_through(transport):
        rest = send_parts(sock, parts)
        if rest:
            transport.write(b"".join(rest))
    else:
        transport.writeSequence([p if type(p) is bytes else bytes(p) for p in parts])


def _reads_on(transport):
    """True while Twisted would still read from the transport's socket."""
    return (transport.connected and not transport.disconnecting
            and not getattr(transport, "_aborting", False))


def send_parts(sock, pieces):
    """Give ``pieces`` to the kernel as they are, with as few ``sendmsg()``
    calls as it takes now; return the list of what it did not take (the
    first item possibly a view of a piece's tail)."""
    start = 0
    while start < len(pieces):
        batch = pieces[start:start + IOV_MAX]
        try:
            sent = sock.sendmsg(batch, (), _NOSIGNAL)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                return pieces[start:]  # Twisted's own write will report the error
            sent = 0
        for index, piece in enumerate(batch):
            if sent < len(piece):
                rest = pieces[start + index:]
                if sent:
                    rest[0] = memoryview(piece)[sent:]
                return rest
            sent -= len(piece)
        start += len(batch)
    return []


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
        self._socket = stream_socket(self.transport)
        widen_socket_buffers(self.transport, self.socket_buffer)

    def _deliver(self, items):
        for item in items:
            if item[0] == "oversize":
                self.frameTooLong(*item[1:])
            else:
                self.frameReceived(*item)

    def dataReceived(self, data):
        decoder = self._decoder
        self._deliver(decoder.feed(data))
        sock = self._socket
        # The rest of a large frame is read into place now, until the socket
        # has no more; errors and end of stream are left to Twisted's next read.
        while decoder.filling and sock is not None and _reads_on(self.transport):
            try:
                n = sock.recv_into(decoder.unfilled())
            except OSError:
                break
            if not n:
                break
            self._deliver(decoder.filled(n))
        self.transport.bufferSize = FILL_READ_SIZE if decoder.filling else READ_SIZE

    def sendFrame(self, kind, request_id, payload=b"", aux=0, before=b""):
        """Send one frame.  ``payload`` is bytes-like or a list/tuple of
        bytes-like parts, sent in order and never joined when the socket can
        take them now; only what it leaves is copied, into Twisted's buffer.
        ``before``: whole frames (:func:`encode_frame`) to send first, in the
        same write."""
        parts = payload_parts(payload)
        header = encode_header(kind, request_id, sum(len(p) for p in parts), aux)
        if before:
            header = before + header
        parts.insert(0, header)
        write_through(self.transport, self._socket, parts)

    def frameReceived(self, kind, request_id, aux, payload):
        raise NotImplementedError

    def frameTooLong(self, kind, request_id, length):
        """A frame over ``max_payload`` was skipped; default: drop the connection."""
        self.transport.loseConnection()

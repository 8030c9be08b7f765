"""A gRPC client that never reads: just enough HTTP/2, by hand, on a plain socket.

It opens gRPC calls (unary or streaming) and sends their requests, but never
reads a byte of what the server sends and never grants it flow-control
window, as a client that stalls (or means harm) would.  The server may then
send it at most the 65,535 bytes of HTTP/2's initial connection window; every
other response byte has to wait in the server.  Written here rather than
taken from a library so the tests need nothing more than the socket module.
"""
import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING = 0x0, 0x1, 0x3, 0x4, 0x6
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL = 0x8


def frame(kind, flags, stream_id, payload=b""):
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream_id) + payload


def _integer(value, prefix_bits, first=0):
    """An HPACK integer with a ``prefix_bits``-bit prefix (RFC 7541, 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _literal(name, value):
    """A header as a literal without indexing, new name, no Huffman coding."""
    name, value = name.encode(), value.encode()
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def request_headers(path, authority):
    block = b"\x83\x86"  # :method POST, :scheme http (static table)
    for name, value in ((":path", path), (":authority", authority), ("content-type", "application/grpc"),
                        ("te", "trailers")):
        block += _literal(name, value)
    return block


def grpc_message(body):
    return b"\x00" + struct.pack(">I", len(body)) + body


class UnreadingClient:
    """One HTTP/2 connection to ``host:port`` that sends and never reads.

    With ``answer_pings``, a thread reads the socket only to answer the
    server's PINGs and note which calls ended, and drops everything else
    (the DATA of responses included): still no window is granted,
    so the server still cannot send more than 65,535 bytes, but its
    keepalive sees a live client (one that stalls only some calls looks
    like this to the server)."""

    def __init__(self, host, port, answer_pings=False):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive buffer: what the kernel holds for us stays small too.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self._lock = threading.Lock()
        #: Streams the server reset (RST_STREAM), and those it ended with
        #: trailers (a status), seen with ``answer_pings``.
        self.reset = set()
        self.ended = set()
        self.authority = "%s:%d" % (host, port)
        self.next_id = 1
        # Our SETTINGS (defaults: 65,535-byte windows); then, like any
        # client before it stalls, the ACK of the server's SETTINGS.
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self._handshake()
        if answer_pings:
            threading.Thread(target=self._answer_pings, name="rawh2-pings", daemon=True).start()

    def _answer_pings(self):
        buffered = b""
        self.sock.settimeout(None)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffered += chunk
            while len(buffered) >= 9:
                length = int.from_bytes(buffered[:3], "big")
                if len(buffered) < 9 + length:
                    break
                kind, flags, buffered_id = buffered[3], buffered[4], buffered[5:9]
                payload, buffered = buffered[9:9 + length], buffered[9 + length:]
                if kind == PING and not flags & ACK:
                    self._send(frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM:
                    self.reset.add(int.from_bytes(buffered_id, "big") & 0x7FFFFFFF)
                elif kind == HEADERS and flags & END_STREAM:
                    self.ended.add(int.from_bytes(buffered_id, "big") & 0x7FFFFFFF)

    def _send(self, data):
        with self._lock:
            self.sock.sendall(data)

    def _handshake(self):
        """Read the server's first frames until its SETTINGS (ACKed), and
        answer any PING meanwhile: from here on, nothing is read."""
        buffered = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buffered += chunk
            while len(buffered) >= 9:
                length = int.from_bytes(buffered[:3], "big")
                if len(buffered) < 9 + length:
                    break
                kind, flags = buffered[3], buffered[4]
                payload, buffered = buffered[9:9 + length], buffered[9 + length:]
                if kind == PING and not flags & ACK:
                    self.sock.sendall(frame(PING, ACK, 0, payload))
                elif kind == SETTINGS and not flags & ACK:
                    self.sock.sendall(frame(SETTINGS, ACK, 0))
                    return

    @property
    def local_port(self):
        return self.sock.getsockname()[1]

    def open(self, method, bodies=(), end=False):
        """Open a call of ``/inference.GRPCInferenceService/<method>``, send
        ``bodies`` (serialized requests), and half-close it if ``end``; its
        stream id."""
        stream_id = self.next_id
        self.next_id += 2
        path = "/inference.GRPCInferenceService/" + method
        out = frame(HEADERS, END_HEADERS, stream_id, request_headers(path, self.authority))
        for i, body in enumerate(bodies):
            last = end and i == len(bodies) - 1
            out += frame(DATA, END_STREAM if last else 0, stream_id, grpc_message(body))
        if end and not bodies:
            out += frame(DATA, END_STREAM, stream_id)
        self._send(out)
        return stream_id

    def unary(self, method, body):
        return self.open(method, [body], end=True)

    def send(self, stream_id, body):
        """One more request on an open stream."""
        self._send(frame(DATA, 0, stream_id, grpc_message(body)))

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

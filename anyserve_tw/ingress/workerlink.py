"""The ingress's connections to one worker, and request forwarding over them.

Each worker gets a small pool of persistent Unix-socket connections
(:class:`WorkerConnection`), each carrying many requests at once, told apart by
request id (see :mod:`anyserve_tw.wire.framing`).  A request is a Deferred: it fires
with the worker's response bytes, fails with the worker's status, and, when
cancelled (deadline passed, client gone), sends CANCEL so the worker can drop
the work.

If any connection to a worker drops, the worker is treated as gone at once: its
other connections are closed, every request in flight on them fails with
UNAVAILABLE, and ``on_lost`` tells the router to stop routing to it.  A worker
that is in fact still alive finds out from its next heartbeat and registers
again, so no reconnect loop is needed here.
"""
import itertools

import grpc
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from anyserve_tw.wire import defaults, framing
from anyserve_tw.wire.payloads import Timing
from anyserve_tw.wire.errors import InferenceError, invalid_argument, status_from_number, unavailable

def endpoint_for(reactor, address, timeout=5):
    """A client endpoint for a worker address (``unix:///path``)."""
    prefix = defaults.UNIX_PREFIX
    if address.startswith(prefix) and len(address) > len(prefix):
        return UNIXClientEndpoint(reactor, address[len(prefix):], timeout=timeout)
    raise invalid_argument(
        "unsupported worker address %r: expected unix:///path/to/socket" % (address,)
    )


class WorkerConnection(framing.FramedProtocol):
    """One connection to a worker, multiplexing requests by id."""

    def __init__(self, handle, max_payload):
        self.handle = handle
        self.max_payload = max_payload
        self._pending = {}
        self._ids = itertools.count(1)

    @property
    def outstanding(self):
        return len(self._pending)

    def connectionMade(self):
        super().connectionMade()
        if self.handle.shm_table:
            self.sendFrame(framing.SHM_TABLE, 0, self.handle.shm_table)

    def forward(self, payload, timeout=None, kind=framing.REQUEST, listener=None):
        """Send one request of ``kind`` (REQUEST, STREAM_REQUEST or
        HTTP_REQUEST); a Deferred of the response bytes (for HTTP_REQUEST a
        ``(json_length, body)`` tuple).  ``listener``, if given, hears the
        worker's ``timing(Timing)`` and a stream's ``partial(bytes)``
        responses before the Deferred fires."""
        request_id = next(self._ids)
        d = Deferred(lambda _: self._cancel(request_id))
        self._pending[request_id] = (d, listener, kind)
        timeout_ms = 0 if timeout is None else max(1, min(int(timeout * 1000), 0xFFFFFFFF))
        self.sendFrame(kind, request_id, payload, timeout_ms)
        return d

    def _cancel(self, request_id):
        if self._pending.pop(request_id, None) is not None and self.transport.connected:
            self.sendFrame(framing.CANCEL, request_id)

    def frameReceived(self, kind, request_id, aux, payload):
        if kind == framing.RESPONSE:
            entry = self._pending.pop(request_id, None)
            if entry is not None:  # else cancelled while the worker answered
                d, _, sent = entry
                d.callback((aux, payload) if sent == framing.HTTP_REQUEST else payload)
        elif kind == framing.ERROR:
            entry = self._pending.pop(request_id, None)
            if entry is not None:
                entry[0].errback(InferenceError(status_from_number(aux), payload.decode("utf-8", "replace")))
        elif kind == framing.TIMING or kind == framing.PARTIAL:
            entry = self._pending.get(request_id)
            if entry is None or entry[1] is None:
                return
            try:
                if kind == framing.TIMING:
                    entry[1].timing(Timing.unpack(payload))
                elif entry[2] == framing.STREAM_REQUEST:
                    entry[1].partial(payload)
            except Exception:
                self._broken(request_id, "worker sent a malformed %s frame" % framing.KIND_NAMES[kind])
        else:
            self._broken(request_id, "worker sent an unexpected frame type %d" % kind)

    def _broken(self, request_id, reason):
        """The worker broke the protocol: fail that request and drop the
        connection (and so the worker: see the module docstring)."""
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            entry[0].errback(unavailable(reason))
        self.transport.loseConnection()

    def frameTooLong(self, kind, request_id, length):
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            entry[0].errback(
                InferenceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "worker response of %d bytes exceeds the %d-byte limit"
                    % (length, self.max_payload),
                )
            )

    def connectionLost(self, reason):
        pending, self._pending = self._pending, {}
        error = unavailable(
            "worker %s went away mid-request (%s)" % (self.handle.worker_id, self.handle.lost_reason)
        )
        for d, _, _ in pending.values():
            d.errback(error)
        self.handle._connectionLost(self)


class WorkerHandle:
    """The ingress's view of one worker: its address, connections and load."""

    def __init__(self, reactor, worker_id, address, on_lost, pool_size=2,
                 max_payload=defaults.MAX_MESSAGE_SIZE, connect_timeout=5):
        self.worker_id = worker_id
        self.address = address
        self._endpoint = endpoint_for(reactor, address, connect_timeout)  # fails early on a bad address
        self.last_heartbeat = reactor.seconds()
        self.lost_reason = "connection closed"
        self._reactor = reactor
        self._on_lost = on_lost
        self._pool_size = pool_size
        self._max_payload = max_payload
        self._connections = []
        self._waiters = []
        self._ready = False
        self._closed = False
        #: The SHM_TABLE payload every connection gets first (b"": none).
        self.shm_table = b""

    def __repr__(self):
        return "<WorkerHandle %s %s>" % (self.worker_id, self.address)

    @property
    def outstanding(self):
        return sum(c.outstanding for c in self._connections)

    @property
    def closed(self):
        return self._closed

    def connect(self):
        """Open the pool; a Deferred that fires when every connection is up.

        Concurrent callers (a worker registering several models at once) share
        the same attempt.  Fails with UNAVAILABLE if the worker can't be reached.
        """
        if self._closed:
            return fail(unavailable("worker %s is gone" % self.worker_id))
        d = Deferred()
        if self._ready:
            d.callback(self)
            return d
        self._waiters.append(d)
        if len(self._waiters) == 1:
            factory = Factory.forProtocol(lambda: WorkerConnection(self, self._max_payload))
            factory.noisy = False  # one log line per worker, not per connection
            attempts = [
                self._endpoint.connect(factory).addCallback(self._adopt)
                for _ in range(self._pool_size)
            ]
            gatherResults(attempts, consumeErrors=True).addCallbacks(
                self._connected, self._connectFailed
            ).addBoth(self._notifyWaiters)
        return d

    def _adopt(self, connection):
        if self._closed:  # came up after the pool failed or was closed
            connection.transport.abortConnection()
        else:
            self._connections.append(connection)

    def _connected(self, _):
        if self._closed:
            raise unavailable("worker %s went away while connecting" % self.worker_id)
        self._ready = True
        return self

    def _connectFailed(self, failure):
        reason = failure.value.subFailure.getErrorMessage()
        self.close("connect failed")
        raise unavailable(
            "cannot reach worker %s at %s: %s" % (self.worker_id, self.address, reason)
        )

    def _notifyWaiters(self, result):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def forward(self, payload, timeout=None, kind=framing.REQUEST, listener=None):
        """Forward a request on the least busy connection; see
        :meth:`WorkerConnection.forward`."""
        connections = self._connections
        if not self._ready or self._closed:
            raise unavailable("worker %s is not connected" % self.worker_id)
        best = connections[0]
        for c in connections[1:]:
            if c.outstanding < best.outstanding:
                best = c
        return best.forward(payload, timeout, kind, listener)

    def send_shm_table(self, table):
        """Send the shared-memory table (SHM_TABLE payload) on every
        connection, ahead of any request that may name its regions."""
        self.shm_table = table
        for c in self._connections:
            if c.transport.connected:
                c.sendFrame(framing.SHM_TABLE, 0, table)

    def close(self, reason):
        """Drop every connection; requests in flight fail with UNAVAILABLE."""
        if not self._closed:
            self.lost_reason = reason
        self._closed = True
        for c in list(self._connections):
            c.transport.abortConnection()

    def _connectionLost(self, connection):
        if connection in self._connections:
            self._connections.remove(connection)
        self.close(self.lost_reason)
        if self._on_lost is not None:
            on_lost, self._on_lost = self._on_lost, None
            on_lost(self)

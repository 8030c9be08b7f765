"""The ingress's connections to one worker, and request forwarding over them.

Each worker gets a small pool of persistent connections
(:class:`WorkerConnection`), each carrying many requests at once, told apart by
request id (see :mod:`anyserve_tw.wire.framing`).  A request is a Deferred: it fires
with the worker's response bytes, fails with the worker's status, and, when
cancelled (deadline passed, client gone), sends CANCEL so the worker can drop
the work.

A worker on this host listens on a Unix socket (``unix:///path``); one on
another host on TCP, with mutual TLS (``tls://host:port``: its certificate
must chain to the ingress's CA and name ``host``, and the ingress presents
its own; :mod:`anyserve_tw.wire.tlsconfig`) or, behind ``--insecure-workers``
only, plain (``tcp://host:port``).  The frames are the same on all three.

If a Unix-socket connection drops, the worker is treated as gone at once
(only a dead process drops one): its other connections are closed, every
request in flight on them fails with UNAVAILABLE, and ``on_lost`` tells the
router to stop routing to it.  A worker that is in fact still alive finds
out from its next heartbeat and registers again.  Over the network a
connection may also drop in a blip while the worker lives: the requests in
flight on it fail, the worker keeps serving on its other connections, and
the dropped one is reconnected with back-off (:data:`RECONNECT_DELAYS`);
only when none is left, or a slot stays down past ``reconnect_window``, is
the worker given up (and it registers again at its next heartbeat, as
above).  A dead host is noticed by the router when its heartbeats stop.
"""
import itertools

import grpc
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from anyserve_tw.wire import defaults, framing, tlsconfig
from anyserve_tw.wire.payloads import Timing
from anyserve_tw.wire.errors import InferenceError, invalid_argument, status_from_number, unavailable

log = Logger()

#: The worker's first frame on a TLS connection (kind, request id): a TIMING
#: for request 0, which no request has, so an ingress that does not wait
#: for it ignores it.  See :class:`WorkerConnection`.
HELLO = (framing.TIMING, 0)

#: Seconds between attempts to reconnect a dropped network connection.
RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)

#: Seconds between two log lines about refusing the same worker address.
REFUSAL_LOG_EVERY = 60.0
_refusals_said = {}  # address -> reactor time of the last line (bounded below)


def _say_refused(reactor, address, message, **fields):
    """Log why a worker was refused, at most once a minute per address: a
    refused worker retries its registration every tick."""
    now = reactor.seconds()
    said = _refusals_said.get(address)
    if said is not None and now - said < REFUSAL_LOG_EVERY:
        return
    if len(_refusals_said) > 1024:
        _refusals_said.clear()
    _refusals_said[address] = now
    log.error(message, address=address, **fields)


def endpoint_for(reactor, address, timeout=5, tls=None, insecure_tcp=False):
    """A client endpoint for a worker address: ``unix:///path``,
    ``tls://host:port`` (needs ``tls``, a
    :class:`~anyserve_tw.wire.tlsconfig.MutualTls`) or ``tcp://host:port``
    (only if ``insecure_tcp``).  INVALID_ARGUMENT for anything else."""
    prefix = defaults.UNIX_PREFIX
    if address.startswith(prefix) and len(address) > len(prefix):
        return UNIXClientEndpoint(reactor, address[len(prefix):], timeout=timeout)
    try:
        network = tlsconfig.parse_network_address(address)
    except ValueError as e:
        raise invalid_argument("unsupported worker address: %s" % (e,))
    if network is None:
        raise invalid_argument(
            "unsupported worker address %r: expected unix:///path/to/socket, "
            "tls://host:port or tcp://host:port" % (address,)
        )
    scheme, host, port = network
    if scheme == tlsconfig.TCP_SCHEME and not insecure_tcp:
        raise invalid_argument("worker address %r is plain TCP: this ingress takes tcp:// workers "
                               "only with --insecure-workers (use tls://)" % (address,))
    if scheme == tlsconfig.TLS_SCHEME and tls is None:
        raise invalid_argument("worker address %r needs TLS: this ingress has no --tls-ca "
                               "(with --tls-cert/--tls-key) to connect with" % (address,))
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if scheme == tlsconfig.TLS_SCHEME:
        endpoint = wrapClientTLS(tls.client_options(host), endpoint)
    return endpoint


class WorkerConnection(framing.FramedProtocol):
    """One connection to a worker, multiplexing requests by id.

    ``ready`` fires with the connection once it can carry requests: at once,
    or over TLS once the worker says it accepted our certificate; it fails
    with the reason if the connection is lost before.  Under TLS 1.3 a
    client's handshake is over before the server has checked the client's
    certificate, so the handshake alone would let an ingress the worker
    refuses register it and lose it at once: the worker's first frame,
    :data:`HELLO`, sent once its side of the handshake is done, is what
    says the connection is up."""

    def __init__(self, handle, max_payload, tls=False, network=None):
        self.handle = handle
        self.max_payload = max_payload
        self._pending = {}
        self._ids = itertools.count(1)
        self._tls = tls
        self._network = tls if network is None else network  # over TCP
        self._up = False  # ready fired: requests may be sent
        self.ready = Deferred(lambda _: self.transport.abortConnection())
        self.ready.addCallback(self._isUp)

    def _isUp(self, result):
        self._up = True
        return result

    @property
    def outstanding(self):
        return len(self._pending)

    def connectionMade(self):
        super().connectionMade()
        if self.handle.shm_table:
            self.sendFrame(framing.SHM_TABLE, 0, self.handle.shm_table)
        if self._network:
            tlsconfig.set_no_delay(self.transport)
        if not self._tls:
            self.ready.callback(self)

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
            if (kind, request_id) == HELLO and not self.ready.called:
                self.ready.callback(self)
                return
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

    def _diagnose(self, reason):
        """The reason, or why the worker's certificate was refused when the
        TLS options noted it (:mod:`anyserve_tw.wire.tlsconfig`)."""
        connection = getattr(self.transport, "_tlsConnection", None)
        refusal = getattr(connection, "refusal", None)
        if refusal is None:
            return reason
        return Failure(ConnectionError("the worker's certificate is refused: %s" % refusal))

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
        if not self._up:  # never carried a request: the connect attempt fails
            if not self.ready.called:
                self.ready.errback(self._diagnose(reason))
            return
        pending, self._pending = self._pending, {}
        error = unavailable(
            "worker %s went away mid-request (%s)" % (self.handle.worker_id, self.handle.lost_reason)
        )
        for d, _, _ in pending.values():
            d.errback(error)
        self.handle._connectionLost(self)


class WorkerHandle:
    """The ingress's view of one worker: its address, connections and load.

    ``tls`` (a :class:`~anyserve_tw.wire.tlsconfig.MutualTls`) lets it reach
    ``tls://`` workers, ``insecure_tcp`` ``tcp://`` ones; ``reconnect_window``
    is how long a dropped network connection is retried before the worker
    is given up."""

    def __init__(self, reactor, worker_id, address, on_lost, pool_size=2,
                 max_payload=defaults.MAX_MESSAGE_SIZE, connect_timeout=5, tls=None,
                 insecure_tcp=False, reconnect_window=10.0):
        self.worker_id = worker_id
        self.address = address
        try:  # fails early on a bad address
            self._endpoint = endpoint_for(reactor, address, connect_timeout, tls, insecure_tcp)
        except InferenceError as e:
            _say_refused(reactor, address, "refused worker {worker} at {address}: {why}",
                         worker=worker_id, why=e.message)
            raise
        self._tls = address.startswith(tlsconfig.TLS_SCHEME + "://")
        #: Over TCP (tls:// or tcp://), not a Unix socket.
        self.network = not address.startswith(defaults.UNIX_PREFIX)
        self.reconnect_window = reconnect_window
        self._connect_timeout = connect_timeout
        self.last_heartbeat = reactor.seconds()
        self.lost_reason = "connection closed"
        self._reactor = reactor
        self._on_lost = on_lost
        self._pool_size = pool_size
        self._max_payload = max_payload
        self._connections = []
        self._waiters = []
        self._reconnects = set()  # IDelayedCalls of pending reconnect attempts
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
            attempts = [self._connect_one().addCallback(self._adopt) for _ in range(self._pool_size)]
            gatherResults(attempts, consumeErrors=True).addCallbacks(
                self._connected, self._connectFailed
            ).addBoth(self._notifyWaiters)
        return d

    def _connect_one(self):
        """A Deferred of one more connection, ready for requests."""
        factory = Factory.forProtocol(lambda: WorkerConnection(self, self._max_payload, self._tls,
                                                                     self.network))
        factory.noisy = False  # one log line per worker, not per connection
        return self._endpoint.connect(factory).addCallback(
            lambda connection: connection.ready.addTimeout(self._connect_timeout, self._reactor))

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
        reason = _describe(failure.value.subFailure)
        self.close("connect failed")
        if self.network:
            _say_refused(self._reactor, self.address, "cannot connect to worker {worker} at "
                         "{address}: {reason}", worker=self.worker_id, reason=reason)
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
        for call in self._reconnects:
            if call.active():
                call.cancel()
        self._reconnects.clear()
        for c in list(self._connections):
            c.transport.abortConnection()

    def _connectionLost(self, connection):
        if connection in self._connections:
            self._connections.remove(connection)
        if self.network and self._ready and not self._closed and self._connections:
            log.warn("worker {worker} at {address}: a connection dropped, reconnecting it "
                     "({count} left)", worker=self.worker_id, address=self.address,
                     count=len(self._connections))
            self._reconnect(0, self._reactor.seconds())
            return
        self._give_up(self.lost_reason)

    def _give_up(self, reason):
        self.close(reason)
        if self._on_lost is not None:
            on_lost, self._on_lost = self._on_lost, None
            on_lost(self)

    def _reconnect(self, attempt, since):
        """Try one dropped connection again after the attempt's delay."""
        if self._closed:
            return
        delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
        call = self._reactor.callLater(delay, self._reconnect_now, attempt, since)
        self._reconnects.add(call)

    def _reconnect_now(self, attempt, since):
        self._reconnects = {c for c in self._reconnects if c.active()}
        if self._closed:
            return
        self._connect_one().addCallbacks(self._reconnected, self._reconnect_failed,
                                         errbackArgs=(attempt, since))

    def _reconnected(self, connection):
        if self._closed:
            connection.transport.abortConnection()
            return
        self._connections.append(connection)
        log.info("worker {worker} at {address}: reconnected ({count} connections)",
                 worker=self.worker_id, address=self.address, count=len(self._connections))

    def _reconnect_failed(self, failure, attempt, since):
        if self._closed:
            return
        waited = self._reactor.seconds() - since
        if waited >= self.reconnect_window:
            self._give_up("could not reconnect for %.1fs: %s" % (waited, _describe(failure)))
        else:
            self._reconnect(attempt + 1, since)


def _describe(failure):
    """A readable reason a connection attempt failed, TLS ones included
    (pyOpenSSL's errors are lists of (library, function, reason))."""
    from OpenSSL import SSL
    from twisted.internet.defer import TimeoutError

    error = failure.value
    if isinstance(error, TimeoutError):
        return "timed out: TLS was set up but the worker never said it was ready (not an AnyServe worker?)"
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [r[-1] for r in error.args[0] if isinstance(r, tuple) and r and r[-1]]
        if any("alert" in r for r in reasons):  # the worker ended the handshake
            return "the worker refused this ingress's certificate (%s)" % "; ".join(reasons)
        if reasons:
            return "TLS handshake failed: %s" % "; ".join(reasons)
    return failure.getErrorMessage()

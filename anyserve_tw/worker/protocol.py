"""The worker's side of its ingress connections.

:class:`WorkerProtocol` speaks frames on one connection: it hands each
REQUEST to the :class:`~anyserve_tw.worker.execution.Execution` and writes
the answer back, unless a CANCEL came first.  :class:`ModelServer` listens
on the worker's Unix socket, or for a worker on another host on TCP (with
mutual TLS: only a client whose certificate the CA signed gets a
connection), and, on shutdown, closes the connections only once the
requests in flight are answered.
"""
import os

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from anyserve_tw.wire import defaults, framing, tlsconfig

log = Logger()


@implementer(IHandshakeListener)
class WorkerProtocol(framing.FramedProtocol):
    """One ingress connection; its requests in flight are tracked by id.

    ``on_refused(peer, failure)``, if given, hears of a TLS connection lost
    before its handshake completed (a client without a valid certificate)."""

    def __init__(self, execution, connections=None, on_refused=None):
        self.execution = execution
        self.on_refused = on_refused
        self.handshake_done = False
        self.max_payload = execution.max_payload
        self.connections = connections if connections is not None else set()
        self.inflight = {}
        self.closed = Deferred()
        #: The regions the ingress told this connection of: the SHM_TABLE
        #: frames of a worker's several connections are not ordered with
        #: respect to each other, so each request reads its own's.
        self.shared_memory = execution.shared_memory.view(self)

    #: Set by a ModelServer listening on TCP.
    network = False

    def connectionMade(self):
        super().connectionMade()
        self.connections.add(self)
        if self.network:
            tlsconfig.set_no_delay(self.transport)

    def handshakeCompleted(self):
        """TLS is up, the ingress's certificate accepted: say so (the
        ingress waits for this before it sends requests; see
        :data:`anyserve_tw.ingress.workerlink.HELLO`)."""
        self.handshake_done = True
        self.sendFrame(framing.TIMING, 0, b"")

    def frameReceived(self, kind, request_id, aux, payload):
        if kind == framing.REQUEST:
            d = self.execution.execute(payload, aux / 1000.0 if aux else None,
                                       shared_memory=self.shared_memory)
            self.inflight[request_id] = d
            d.addBoth(self._reply, request_id)
        elif kind == framing.STREAM_REQUEST or kind == framing.HTTP_REQUEST:
            d = self.execution.execute(payload, aux / 1000.0 if aux else None, kind,
                                       lambda parts: self._partial(request_id, parts),
                                       self.shared_memory)
            self.inflight[request_id] = d
            d.addBoth(self._reply, request_id)
        elif kind == framing.CANCEL:
            d = self.inflight.pop(request_id, None)
            if d is not None:
                d.cancel()
        elif kind == framing.SHM_TABLE:
            try:
                self.execution.shared_memory.update(payload, source=self)
            except Exception:
                log.failure("malformed shared-memory table from the ingress")
        else:
            log.warn("unexpected frame type {kind} from the ingress", kind=kind)

    def _partial(self, request_id, parts):
        """One of a stream's responses, unless the ingress gave up on it."""
        if request_id in self.inflight:
            self.sendFrame(framing.PARTIAL, request_id, parts)

    def _reply(self, answer, request_id):
        # Not in flight any more: the ingress cancelled it and wants no answer.
        if self.inflight.pop(request_id, None) is None:
            return
        try:
            if isinstance(answer, Failure):  # building the answer itself failed
                answer.raiseException()
            timing = answer.timing
            before = framing.encode_frame(framing.TIMING, request_id, timing.pack()) if timing else b""
            self.sendFrame(answer.kind, request_id, answer.payload, answer.code, before)
        except Exception:
            log.failure("answering request {id}", id=request_id)
            self.sendFrame(framing.ERROR, request_id, b"worker failed to answer",
                           grpc.StatusCode.INTERNAL.value[0])

    def frameTooLong(self, kind, request_id, length):
        self.sendFrame(
            framing.ERROR, request_id,
            ("request of %d bytes exceeds the worker's %d-byte limit" % (length, self.max_payload)).encode(),
            grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        )

    def connectionLost(self, reason):
        if self.on_refused is not None and not self.handshake_done:
            self.on_refused(self.transport.getPeer(), reason)
        self.connections.discard(self)
        self.execution.shared_memory.forget(self)
        inflight, self.inflight = self.inflight, {}
        for d in inflight.values():
            d.cancel()
        self.closed.callback(None)


class ModelServer(Service):
    """Serves an Execution's requests on a Unix socket, or on ``listen``
    (``tls://host:port`` with ``tls``, a
    :class:`~anyserve_tw.wire.tlsconfig.MutualTls`; or ``tcp://host:port``);
    registered as ``advertise`` if given (a host others can reach when
    ``listen`` binds every interface)."""

    #: The protocol each ingress connection gets.
    protocol = WorkerProtocol

    #: Seconds between two log lines about refused connections from one host.
    REFUSAL_LOG_EVERY = 60.0

    def __init__(self, reactor, execution, socket_path, grace=10.0, listen=None, tls=None,
                 advertise=None):
        self.reactor = reactor
        self.execution = execution
        self.socket_path = socket_path
        self.grace = grace
        self.listen = listen
        self.advertise = advertise
        self.tls = tls
        self.connections = set()
        self._port = None
        self._refusals_said = {}
        self._endpoint = self._server_endpoint()  # a bad address fails here, before anything starts

    @property
    def address(self):
        if self.advertise:
            return self.advertise
        if self.listen:
            return self.listen
        return defaults.UNIX_PREFIX + self.socket_path

    def _server_endpoint(self):
        if not self.listen:
            return UNIXServerEndpoint(self.reactor, self.socket_path, mode=0o600)
        network = tlsconfig.parse_network_address(self.listen)
        if network is None:
            raise ValueError("%s=%r: expected tls://HOST:PORT or tcp://HOST:PORT"
                             % (tlsconfig.ENV_LISTEN, self.listen))
        scheme, host, port = network
        if self.advertise is not None:
            try:
                advertised = tlsconfig.parse_network_address(self.advertise)
            except ValueError:
                advertised = None
            if advertised is None or advertised[0] != scheme:
                raise ValueError("%s=%r: expected %s://HOST:PORT, as %s" % (
                    tlsconfig.ENV_ADVERTISE, self.advertise, scheme, tlsconfig.ENV_LISTEN))
        if self.advertise is None and host in ("0.0.0.0", "::"):
            raise ValueError("%s binds every interface: set %s to an address the ingress can reach"
                             % (tlsconfig.ENV_LISTEN, tlsconfig.ENV_ADVERTISE))
        if scheme == tlsconfig.TLS_SCHEME:
            if self.tls is None:
                raise ValueError("%s=%s needs %s, %s and %s" % (
                    tlsconfig.ENV_LISTEN, self.listen, tlsconfig.ENV_TLS_CA, tlsconfig.ENV_TLS_CERT,
                    tlsconfig.ENV_TLS_KEY))
            return SSL4ServerEndpoint(self.reactor, port, self.tls.server_options(), interface=host)
        tcp = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        return tcp(self.reactor, port, interface=host)

    def _refused(self, peer, reason):
        """A TLS client went away before its handshake completed: most
        likely refused for its certificate.  Logged once a minute per host."""
        host = getattr(peer, "host", str(peer))
        now = self.reactor.seconds()
        said = self._refusals_said.get(host)
        if said is not None and now - said < self.REFUSAL_LOG_EVERY:
            return
        self._refusals_said[host] = now
        log.error("refused a connection from {host} before TLS was set up: {reason}",
                  host=host, reason=reason.getErrorMessage())

    def startService(self):
        if not self.listen and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # left behind by a killed predecessor
        self.execution.start()
        on_refused = self._refused if self.tls is not None and self.listen else None
        def build():
            protocol = self.protocol(self.execution, self.connections)
            protocol.on_refused = on_refused  # set after: subclasses keep the two-argument form
            protocol.network = bool(self.listen)
            return protocol

        factory = Factory.forProtocol(build)
        factory.noisy = False
        #: Fires once listening; fails if the socket can't be bound.
        self.listening = self._endpoint.listen(factory)
        self.listening.addCallback(self._listening)
        super().startService()

    def _listening(self, port):
        self._port = port
        log.info("worker listening on {where}", where=self.listen or self.socket_path)
        return port

    def stopService(self):
        """Stop accepting, let requests in flight finish (up to ``grace``), clean up."""
        super().stopService()
        d = maybeDeferred(self._port.stopListening) if self._port else succeed(None)
        d.addCallback(lambda _: self.execution.stop(self.grace))
        d.addCallback(lambda _: self._close_connections())
        d.addBoth(self._remove_socket)
        return d

    def _close_connections(self):
        """Close every connection once its last answers are written: the
        reactor's own shutdown would drop unsent bytes."""
        closing = [c.closed for c in self.connections]
        for connection in list(self.connections):
            connection.transport.loseConnection()
        return gatherResults(closing).addTimeout(5, self.reactor).addErrback(lambda _: None)

    def _remove_socket(self, result):
        if self.listen:
            return result
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        return result

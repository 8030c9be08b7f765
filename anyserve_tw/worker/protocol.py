"""The worker's side of its ingress connections.

:class:`WorkerProtocol` speaks frames on one connection: it hands each
REQUEST to the :class:`~anyserve_tw.worker.execution.Execution` and writes
the answer back, unless a CANCEL came first.  :class:`ModelServer` listens
on the worker's Unix socket and, on shutdown, closes the connections only
once the requests in flight are answered.
"""
import os

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from anyserve_tw.wire import defaults, framing

log = Logger()


class WorkerProtocol(framing.FramedProtocol):
    """One ingress connection; its requests in flight are tracked by id."""

    def __init__(self, execution, connections=None):
        self.execution = execution
        self.max_payload = execution.max_payload
        self.connections = connections if connections is not None else set()
        self.inflight = {}
        self.closed = Deferred()
        #: The regions the ingress told this connection of: the SHM_TABLE
        #: frames of a worker's several connections are not ordered with
        #: respect to each other, so each request reads its own's.
        self.shared_memory = execution.shared_memory.view(self)

    def connectionMade(self):
        super().connectionMade()
        self.connections.add(self)

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
        self.connections.discard(self)
        self.execution.shared_memory.forget(self)
        inflight, self.inflight = self.inflight, {}
        for d in inflight.values():
            d.cancel()
        self.closed.callback(None)


class ModelServer(Service):
    """Serves an Execution's requests on a Unix socket."""

    #: The protocol each ingress connection gets.
    protocol = WorkerProtocol

    def __init__(self, reactor, execution, socket_path, grace=10.0):
        self.reactor = reactor
        self.execution = execution
        self.socket_path = socket_path
        self.grace = grace
        self.connections = set()
        self._port = None

    @property
    def address(self):
        return defaults.UNIX_PREFIX + self.socket_path

    def startService(self):
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # left behind by a killed predecessor
        self.execution.start()
        endpoint = UNIXServerEndpoint(self.reactor, self.socket_path, mode=0o600)
        factory = Factory.forProtocol(lambda: self.protocol(self.execution, self.connections))
        factory.noisy = False
        #: Fires once listening; fails if the socket can't be bound.
        self.listening = endpoint.listen(factory)
        self.listening.addCallback(self._listening)
        super().startService()

    def _listening(self, port):
        self._port = port
        log.info("worker listening on {path}", path=self.socket_path)

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
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        return result

"""Tests for anyserve_tw.worker.protocol: frames on an ingress connection and
the Unix-socket service's shutdown order, on fake transports and a fake clock."""
import os

import grpc
import numpy as np
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import framing
from anyserve_tw.worker.app import AnyServe
from anyserve_tw.worker.execution import Execution
from anyserve_tw.worker.protocol import ModelServer, WorkerProtocol
from anyserve_tw.test.test_execution import QueuedPool, infer_request, outputs_of


class FakeReactor(MemoryReactorClock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def frame(kind, request_id, payload=b"", aux=0):
    return framing.encode_header(kind, request_id, len(payload), aux) + payload


def add_app():
    app = AnyServe()
    app.model("add", asynchronous=False)(lambda request: {"sum": request["a"] + request["b"]})
    app.model("now", asynchronous=True)(lambda request: {"sum": request["a"]})
    return app


ADD = infer_request("add", a=np.array([1, 2]), b=np.array([3, 4]))
NOW = infer_request("now", a=np.array([7]))


class Connection:
    """A WorkerProtocol on a StringTransport; ``sent()`` decodes what it wrote."""

    def __init__(self, execution, connections=None):
        self.protocol = WorkerProtocol(execution, connections)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self._decoder = framing.FrameDecoder()

    def send(self, *frames):
        self.protocol.dataReceived(b"".join(frames))

    def sent(self, timings=False):
        """The frames written since last asked; TIMING frames only if asked."""
        data = self.transport.value()
        self.transport.clear()
        return [(kind, request_id, aux, bytes(payload))
                for kind, request_id, aux, payload in self._decoder.feed(data)
                if timings or kind != framing.TIMING]


class WorkerProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.pool = QueuedPool()
        self.execution = Execution(self.reactor, add_app(), self.pool, max_payload=4096)
        self.connection = Connection(self.execution)

    def test_requests_are_answered_by_id_in_any_order(self):
        self.connection.send(frame(framing.REQUEST, 7, ADD), frame(framing.REQUEST, 8, NOW))
        [(kind, request_id, aux, payload)] = self.connection.sent()
        self.assertEqual((kind, request_id, aux), (framing.RESPONSE, 8, 0))
        self.assertEqual(outputs_of((kind, payload, aux)), {"sum": [7]})
        self.pool.run()
        [(kind, request_id, aux, payload)] = self.connection.sent()
        self.assertEqual(request_id, 7)
        self.assertEqual(outputs_of((kind, payload, aux)), {"sum": [4, 6]})
        self.assertEqual(self.connection.protocol.inflight, {})

    def test_error_frame_carries_the_status(self):
        self.connection.send(frame(framing.REQUEST, 3, infer_request("nobody")))
        [(kind, request_id, aux, payload)] = self.connection.sent()
        self.assertEqual((kind, request_id, aux), (framing.ERROR, 3, grpc.StatusCode.NOT_FOUND.value[0]))
        self.assertIn(b"'nobody'", payload)

    def test_failing_to_build_an_answer_is_internal(self):
        """A request is answered even when building its answer raises."""
        def broken(result, job=None):
            raise RuntimeError("no answer")

        self.patch(self.execution, "answer", broken)
        self.connection.send(frame(framing.REQUEST, 5, NOW))
        [(kind, request_id, aux, payload)] = self.connection.sent()
        self.assertEqual((kind, request_id, aux), (framing.ERROR, 5, grpc.StatusCode.INTERNAL.value[0]))
        self.assertEqual(self.connection.protocol.inflight, {})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_deadline_from_the_request_frame(self):
        self.connection.send(frame(framing.REQUEST, 5, ADD, aux=1500))
        self.reactor.advance(1.4)
        self.assertEqual(self.connection.sent(), [])
        self.reactor.advance(0.1)
        [(kind, request_id, aux, _)] = self.connection.sent()
        self.assertEqual((kind, request_id, aux),
                         (framing.ERROR, 5, grpc.StatusCode.DEADLINE_EXCEEDED.value[0]))
        self.pool.run()
        self.assertEqual(self.connection.sent(), [])

    def test_cancel_frame_drops_the_request_without_an_answer(self):
        ran = []
        self.execution.app.model("count", asynchronous=False)(lambda r: ran.append(1) or {"n": [1]})
        self.connection.send(frame(framing.REQUEST, 9, infer_request("count")),
                             frame(framing.CANCEL, 9), frame(framing.CANCEL, 404))
        self.pool.run()
        self.assertEqual((self.connection.sent(), ran), ([], []))
        self.assertEqual(self.execution.pending, 0)

    def test_connection_lost_cancels_what_is_in_flight(self):
        self.connection.send(frame(framing.REQUEST, 1, ADD))
        self.connection.protocol.connectionLost(Failure(ConnectionDone()))
        self.pool.run()
        self.assertEqual(self.pool.queue, [])
        self.assertEqual(self.connection.sent(), [])
        self.successResultOf(self.connection.protocol.closed)

    def test_oversize_request_fails_only_itself(self):
        self.connection.send(frame(framing.REQUEST, 2, b"x" * 5000), frame(framing.REQUEST, 3, NOW))
        first, second = self.connection.sent()
        self.assertEqual(first[:3], (framing.ERROR, 2, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]))
        self.assertIn(b"4096-byte limit", first[3])
        self.assertEqual(second[:3], (framing.RESPONSE, 3, 0))

    def test_unexpected_frame_is_ignored(self):
        self.connection.send(frame(framing.RESPONSE, 1, b"?"), frame(framing.REQUEST, 2, NOW))
        self.assertEqual([f[:2] for f in self.connection.sent()], [(framing.RESPONSE, 2)])


class ModelServerTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.pool = QueuedPool()
        self.execution = Execution(self.reactor, add_app(), self.pool)
        self.path = self.mktemp()
        with open(self.path, "w"):
            pass  # a socket file left by a killed predecessor
        self.server = ModelServer(self.reactor, self.execution, self.path, grace=10)
        self.server.startService()

    def accept(self):
        [(path, factory, _backlog, mode, _lock)] = self.reactor.unixServers
        self.assertEqual((path, mode), (self.path, 0o600))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_starts_the_pool_and_replaces_a_stale_socket(self):
        self.assertTrue(self.pool.running)
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(self.server.address, "unix://" + self.path)

    def test_shutdown_answers_in_flight_before_closing(self):
        protocol, transport = self.accept()
        protocol.dataReceived(frame(framing.REQUEST, 1, ADD))
        open(self.path, "w").close()  # as the real listener would leave it
        stopped = self.server.stopService()
        self.reactor.advance(1)
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(stopped)
        self.pool.run()
        self.reactor.advance(0)
        self.assertTrue(self.pool.stopped)
        self.assertTrue(transport.disconnecting)
        frames = framing.FrameDecoder().feed(transport.value())
        self.assertEqual([(kind, request_id) for kind, request_id, _, _ in frames],
                         [(framing.TIMING, 1), (framing.RESPONSE, 1)])
        self.assertNoResult(stopped)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(self.path))

    def test_shutdown_gives_up_on_a_stuck_request_after_grace(self):
        protocol, transport = self.accept()
        protocol.dataReceived(frame(framing.REQUEST, 1, ADD))
        stopped = self.server.stopService()
        self.reactor.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.pool.stopped)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)


class NetworkModelServerTests(SynchronousTestCase):
    """A worker listening on TCP, and on TLS for a worker on another host."""

    def setUp(self):
        self.reactor = FakeReactor()
        self.execution = Execution(self.reactor, add_app(), QueuedPool())

    def test_tcp_listener_registers_its_advertised_address(self):
        server = ModelServer(self.reactor, self.execution, "/unused", listen="tcp://0.0.0.0:7001",
                             advertise="tcp://w1.example:7001")
        server.startService()
        [(port, factory, _backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (7001, "0.0.0.0"))
        self.assertEqual(server.address, "tcp://w1.example:7001")

    def test_advertised_address_must_match_the_listener(self):
        for advertise in ("tls://w1.example:7001", "w1.example:7001", "tcp://w1.example"):
            e = self.assertRaises(ValueError, ModelServer, self.reactor, self.execution, "/unused",
                                  listen="tcp://0.0.0.0:7001", advertise=advertise)
            self.assertIn("ANYSERVE_ADVERTISE", str(e))

    def test_tls_listener_needs_certificates(self):
        e = self.assertRaises(ValueError, ModelServer, self.reactor, self.execution, "/unused",
                              listen="tls://10.0.0.5:7001")
        self.assertIn("ANYSERVE_TLS_CERT", str(e))

    def test_hello_once_tls_is_up(self):
        """The worker's first frame once its side of the handshake is done
        (the ingress's certificate accepted): the ingress waits for it."""
        connection = Connection(self.execution)
        self.assertEqual(connection.sent(timings=True), [])
        connection.protocol.handshakeCompleted()
        self.assertEqual(connection.sent(timings=True), [(framing.TIMING, 0, 0, b"")])

    def test_refusals_logged_once_a_minute_per_host(self):
        from twisted.internet.address import IPv4Address
        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        server = ModelServer(self.reactor, self.execution, "/unused", listen="tcp://10.0.0.5:7001")
        reason = Failure(ConnectionDone("certificate verify failed"))
        for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
            server._refused(IPv4Address("TCP", host, 40000), reason)
        self.reactor.advance(61)
        server._refused(IPv4Address("TCP", "10.0.0.1", 40001), reason)
        lines = [e["host"] for e in logged if "refused a connection" in e.get("log_format", "")]
        self.assertEqual(lines, ["10.0.0.1", "10.0.0.2", "10.0.0.1"])
